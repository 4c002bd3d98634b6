"""The store and node under hard faults: one process per file, values too large for a batch,
durability by default, forks without lock-out, loud pending, integrity, budgets, small cases."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import FLEET

import syncfw
from syncfw import Node

HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from syncfw import Fleet, Grant, Node

    FLEET = Fleet(fleet_id="test-fleet", authority="cloud",
                  grants=(Grant.of("trucks/t7/", "t7"),))

    async def main(path):
        async with Node.open(path, node_id="t7", fleet=FLEET) as node:
            await node.put("trucks/t7/a", 1)
            sys.stdout.write("ready\\n")
            sys.stdout.flush()
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    asyncio.run(main(sys.argv[1]))
    """
)


# ------------------------------------------------------------------ 1. one process per file


async def test_a_second_process_opening_the_file_is_refused_naming_the_holder(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t7.db"
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(syncfw.DatabaseLockedError, match=f"pid {proc.pid}") as info:
            await Node.open(path, node_id="t7", fleet=FLEET)
        assert info.value.holder == f"pid {proc.pid} node t7"
        assert isinstance(info.value, syncfw.StorageError)
        proc.stdin.write("\n")
        proc.stdin.flush()
    assert proc.returncode == 0
    # Released at close: the file opens again, with the holder's write in it.
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        assert await node.get("trucks/t7/a") == 1


async def test_the_lock_is_released_when_the_holder_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "t7.db"
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.kill()
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        assert await node.get("trucks/t7/a") == 1


async def test_a_second_open_in_the_same_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t7.db"
    async with Node.open(path, node_id="t7", fleet=FLEET):
        with pytest.raises(syncfw.DatabaseLockedError, match=f"pid {os.getpid()} node t7"):
            await Node.open(path, node_id="t7", fleet=FLEET)
        with pytest.raises(syncfw.DatabaseLockedError):
            await Node.open(path, node_id="t9", fleet=FLEET)
    # A failed open (another node's file) releases the lock it took.
    with pytest.raises(syncfw.ForeignDatabaseError):
        await Node.open(path, node_id="t9", fleet=FLEET)
    async with Node.open(path, node_id="t7", fleet=FLEET):
        pass
