"""Restore safety: a file that lost its own node's ops (an older backup, a lost WAL) never
re-issues their seqs; writes wait until a peer relays them back, or an operator accepts
the loss. A crash never fences."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import NodeFactory, copy_db, exchange, restore_older_backup

from syncfw import ChainFencedError, Node
from syncfw.cli import main as cli_main
from syncfw.log import op_hash
from syncfw.store.lease import lease_path, read_lease

pytestmark = pytest.mark.asyncio


async def test_an_older_backup_is_fenced_until_a_peer_relays_the_lost_ops(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    path = tmp_path / "t7.db"
    b = await make_node("depot")

    async def hand_to_depot(a: Node) -> None:
        await exchange(a, b)  # the depot holds t7's ops up to 150

    # the operator's backup is taken at seq 10 and restored after seq 150
    a = await restore_older_backup(
        make_node, path, "t7", backed_up=10, written=150, after_writes=hand_to_depot
    )
    assert read_lease(str(path), "t7") == 150  # the lease outlives the restored file
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


def _checkpoint(path: Path) -> None:
    """Copy what the WAL holds into the main file (another connection, as SQLite allows)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    assert busy == 0 and frames == copied > 0


async def test_a_lost_wal_is_fenced_until_a_peer_relays_the_lost_ops(
    make_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "t7.db"
    a = await make_node("t7", path=path)
    b = await make_node("depot")
    for i in range(100):
        await a.put("fleet/t7/k", i)
    _checkpoint(path)  # the first 100 ops move into the main file
    for i in range(100, 150):
        await a.put("fleet/t7/k", i)
    # The main file alone, without the WAL that holds the recent commits.
    shutil.copyfile(path, tmp_path / "main-only.db")
    for i in range(150, 200):
        await a.put("fleet/t7/k", i)
    await exchange(a, b)  # the depot holds t7's ops up to 200
    await a.close()
    lease = read_lease(str(path), "t7")
    assert lease == 200
    shutil.copyfile(tmp_path / "main-only.db", path)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="syncfw.store"):
        a = await make_node("t7", path=path)
    have = (await a.version_vector()).get("t7", 0)
    assert have == 100
    assert f"own chain up to seq {have}, but it once held seq 200" in caplog.text
    with pytest.raises(ChainFencedError, match=rf"own ops {have + 1}\.\.200 ") as info:
        await a.put("fleet/t7/k", "x")
    assert "--accept-lost-ops" in str(info.value)
    assert (await a.version_vector()).get("t7", 0) == have  # the refused write wrote nothing
    assert (await a.status())["metrics"]["chain_fenced"] == 200
    assert a.metrics.value("syncfw_chain_fenced") == 200
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="syncfw.store"):
        await exchange(a, b)  # the depot relays t7's own ops back; the fence lifts
    assert "own chain is back to seq 200; local writes resume" in caplog.text
    assert (await a.version_vector())["t7"] == 200
    assert await a.get("fleet/t7/k") == 199
    assert (await a.status())["metrics"]["chain_fenced"] == 0
    op = await a.put("fleet/t7/k", "after the lost WAL")
    assert op.seq == 201
    assert op.prev == op_hash((await b.ops_since({"t7": 199}))[0])  # continues the chain
    await exchange(a, b)  # no fork: the depot applies it, nothing held or discarded
    assert (await b.version_vector())["t7"] == 201
    assert await b.get("fleet/t7/k") == "after the lost WAL"
    assert b.store.pending() == {} and b.store.discarded() == {}
    assert await a.state_digest() == await b.state_digest()


async def test_a_crash_never_fences(make_node: NodeFactory, tmp_path: Path) -> None:
    path = tmp_path / "t7.db"
    a = await make_node("t7", path=path)
    for i in range(300):
        await a.put("fleet/t7/k", i)
    # What a SIGKILL leaves: the file and its WAL as committed, the lease as last written.
    crash = tmp_path / "crash.db"
    copy_db(path, crash)
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
    copy_db(path, tmp_path / "backup.db")
    a = await make_node("t7", path=path)
    for i in range(100):
        await a.put("fleet/t7/k", i)
    await a.close()
    copy_db(tmp_path / "backup.db", path)
    rc = await asyncio.to_thread(cli_main, ["inspect", str(path), "--accept-lost-ops"])
    assert rc == 0
    a = await make_node("t7", path=path)
    op = await a.put("fleet/t7/k", "accepted")
    assert op.seq == 2
