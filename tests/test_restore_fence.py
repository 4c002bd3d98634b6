"""Restore safety: a file that lost its own node's ops (an older backup, a lost WAL) never
re-issues their seqs; writes wait until a peer relays them back, or an operator accepts
the loss. A crash never fences."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from conftest import NodeFactory, exchange

from syncfw import ChainFencedError
from syncfw.cli import main as cli_main
from syncfw.store.lease import lease_path, read_lease

pytestmark = pytest.mark.asyncio


def _copy_db(src: Path, dst: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        s = Path(str(src) + suffix)
        d = Path(str(dst) + suffix)
        if s.exists():
            shutil.copyfile(s, d)
        elif d.exists():
            d.unlink()


async def test_an_older_backup_is_fenced_until_a_peer_relays_the_lost_ops(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    path = tmp_path / "t7.db"
    a = await make_node("t7", path=path)
    b = await make_node("depot")
    for i in range(10):
        await a.put("fleet/t7/k", i)
    await a.close()
    _copy_db(path, tmp_path / "backup.db")  # the operator's backup, taken at seq 10
    a = await make_node("t7", path=path)
    for i in range(10, 150):
        await a.put("fleet/t7/k", i)
    await exchange(a, b)  # the depot holds t7's ops up to 150
    await a.close()
    assert read_lease(str(path), "t7") == 150
    _copy_db(tmp_path / "backup.db", path)  # restored: the file is back at seq 10
    a = await make_node("t7", path=path)
    with pytest.raises(ChainFencedError, match=r"11\.\.150"):
        await a.put("fleet/t7/k", "after the restore")
    st = await a.status()
    assert st["metrics"]["chain_fenced"] == 150
    await exchange(a, b)  # the depot relays t7's own ops back; the fence lifts
    assert (await a.version_vector())["t7"] == 150
    op = await a.put("fleet/t7/k", "after the restore")
    assert op.seq == 151
    await exchange(a, b)  # no fork: the depot applies it
    assert await b.get("fleet/t7/k") == "after the restore"


async def test_a_lost_wal_is_fenced(make_node: NodeFactory, tmp_path: Path) -> None:
    path = tmp_path / "t7.db"
    a = await make_node("t7", path=path)
    for i in range(100):
        await a.put("fleet/t7/k", i)
    # The main file alone, without the WAL that holds the recent commits.
    shutil.copyfile(path, tmp_path / "main-only.db")
    for i in range(100, 200):
        await a.put("fleet/t7/k", i)
    await a.close()
    lease = read_lease(str(path), "t7")
    assert lease == 200
    shutil.copyfile(tmp_path / "main-only.db", path)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    a = await make_node("t7", path=path)
    have = (await a.version_vector()).get("t7", 0)
    assert have < 200
    with pytest.raises(ChainFencedError):
        await a.put("fleet/t7/k", "x")


async def test_a_crash_never_fences(make_node: NodeFactory, tmp_path: Path) -> None:
    path = tmp_path / "t7.db"
    a = await make_node("t7", path=path)
    for i in range(300):
        await a.put("fleet/t7/k", i)
    # What a SIGKILL leaves: the file and its WAL as committed, the lease as last written.
    crash = tmp_path / "crash.db"
    _copy_db(path, crash)
    shutil.copyfile(lease_path(str(path)), lease_path(str(crash)))
    assert 0 < read_lease(str(crash), "t7") <= 300
    c = await make_node("t7", path=crash)
    op = await c.put("fleet/t7/k", "after the crash")
    assert op.seq == 301


async def test_the_operator_can_accept_the_loss(make_node: NodeFactory, tmp_path: Path) -> None:
    path = tmp_path / "t7.db"
    a = await make_node("t7", path=path)
    await a.put("fleet/t7/k", 1)
    await a.close()
    _copy_db(path, tmp_path / "backup.db")
    a = await make_node("t7", path=path)
    for i in range(100):
        await a.put("fleet/t7/k", i)
    await a.close()
    _copy_db(tmp_path / "backup.db", path)
    rc = await asyncio.to_thread(cli_main, ["inspect", str(path), "--accept-lost-ops"])
    assert rc == 0
    a = await make_node("t7", path=path)
    op = await a.put("fleet/t7/k", "accepted")
    assert op.seq == 2
