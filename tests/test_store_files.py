"""The store file: bad files refused untouched, disk full, clock high-water mark, SIGKILL."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import FLEET, START_MS, FakeClock, NodeFactory

import syncfw
from syncfw import Node, StoreConfig


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_corrupt_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    path.write_bytes(b"this is not a database" * 500)
    before = digest(path)
    with pytest.raises(syncfw.CorruptDatabaseError):
        await Node.open(path, node_id="t7", fleet=FLEET)
    assert digest(path) == before


async def test_damaged_pages_are_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "n.db"
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        for i in range(300):
            await node.put(f"trucks/t7/k{i}", "x" * 200)
    data = bytearray(path.read_bytes())
    for off in range(4096 * 2, len(data), 4096):  # scribble over every page but the header
        data[off : off + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises((syncfw.CorruptDatabaseError, syncfw.StorageError)):
        async with Node.open(path, node_id="t7", fleet=FLEET) as node:
            await node.scan("trucks/t7/")


async def test_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    conn.close()
    before = digest(path)
    with pytest.raises(syncfw.ForeignDatabaseError, match="not a syncfw store"):
        await Node.open(path, node_id="t7", fleet=FLEET)
    assert digest(path) == before


@pytest.mark.parametrize("had_members", [True, False])
async def test_a_version_2_file_migrates_to_3_with_the_member_table(
    tmp_path: Path, had_members: bool
) -> None:
    path = tmp_path / "n.db"
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        await node.put("trucks/t7/x", 1)
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE mesh_members")
    if had_members:  # a version-2 mesh created it on its first save
        conn.execute(
            "CREATE TABLE mesh_members (address TEXT PRIMARY KEY, node_id TEXT NOT NULL, "
            "last_seen_ms INTEGER NOT NULL) WITHOUT ROWID"
        )
        conn.execute("INSERT INTO mesh_members VALUES ('10.0.0.9:7000', 'depot', 5)")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        assert await node.get("trucks/t7/x") == 1
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
        rows = conn.execute("SELECT address, node_id FROM mesh_members").fetchall()
        assert rows == ([("10.0.0.9:7000", "depot")] if had_members else [])
    finally:
        conn.close()


async def test_newer_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "n.db"
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        await node.put("trucks/t7/x", 1)
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    before = digest(path)
    with pytest.raises(syncfw.SchemaVersionError, match="99"):
        await Node.open(path, node_id="t7", fleet=FLEET)
    assert digest(path) == before


async def test_another_nodes_or_fleets_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "n.db"
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        await node.put("trucks/t7/x", 1)
    with pytest.raises(syncfw.ForeignDatabaseError, match="belongs to node 't7'"):
        await Node.open(path, node_id="t9", fleet=FLEET)
    with pytest.raises(syncfw.ForeignDatabaseError, match="fleet"):
        await Node.open(path, node_id="t7", fleet=syncfw.Fleet(fleet_id="elsewhere"))
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        assert await node.get("trucks/t7/x") == 1


async def test_storage_full_rolls_back_and_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "small.db"
    cfg = StoreConfig(max_bytes=256 * 1024)
    acked: dict[str, int] = {}
    async with Node.open(path, node_id="t7", fleet=FLEET, config=cfg) as node:

        async def fill() -> None:
            for i in range(100_000):
                await node.put(f"trucks/t7/k{i}", "x" * 500)
                acked[f"trucks/t7/k{i}"] = i

        with pytest.raises(syncfw.StorageFullError):
            await fill()
        assert len(acked) > 50
        vv = await node.version_vector()
        assert vv == {"t7": len(acked)}
        # the node keeps serving reads, and a later small write fails cleanly too
        assert await node.get(f"trucks/t7/k{len(acked) - 1}") == "x" * 500
    async with Node.open(path, node_id="t7", fleet=FLEET, config=cfg) as node:
        assert await node.version_vector() == {"t7": len(acked)}
        got = await node.scan("trucks/t7/")
        assert set(got) == set(acked)
        # with no known peer nothing is causally stable, so nothing is compacted
        assert await node.compact() == 0


async def test_restart_with_clock_in_the_past_never_goes_backwards(tmp_path: Path) -> None:
    path = tmp_path / "n.db"
    clock = FakeClock(START_MS)
    async with Node.open(path, node_id="t7", fleet=FLEET, clock=clock) as node:
        last = (await node.put("trucks/t7/x", 1)).hlc
    clock.ms = START_MS - 3_600_000  # the RTC came back an hour early
    async with Node.open(path, node_id="t7", fleet=FLEET, clock=clock) as node:
        op = await node.put("trucks/t7/x", 2)
        assert op.hlc > last
        assert await node.get("trucks/t7/x") == 2


async def test_remote_high_water_is_persisted_too(make_node: NodeFactory, clock: FakeClock) -> None:
    a = await make_node("t7")
    remote = syncfw.Op("t9", 1, (clock.ms + 400) << 16, "fleet/t9/", 0, "fleet/t9/x", "lww",
                       syncfw.log.encode_value(1))
    await a.apply_remote([remote])
    path = a.store.path
    await a.close()
    b = await make_node("t7", path=Path(path))
    assert (await b.put("trucks/t7/y", 1)).hlc > remote.hlc


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from syncfw import Fleet, Grant, Node, StoreConfig

    async def main(path, sync):
        fleet = Fleet(fleet_id="test-fleet", authority="cloud",
                      grants=(Grant.of("trucks/t7/", "t7"),))
        node = await Node.open(path, node_id="t7", fleet=fleet,
                               config=StoreConfig(synchronous=sync))
        i = 0
        async def writer(w):
            nonlocal i
            while True:
                i += 1
                key = f"trucks/t7/w{w}-{i}"
                await node.put(key, i)
                sys.stdout.write(key + "\\n")
                sys.stdout.flush()
        await asyncio.gather(*(writer(w) for w in range(16)))

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.parametrize("sync", ["NORMAL", "FULL"])
async def test_sigkill_mid_stream_loses_no_acknowledged_op(tmp_path: Path, sync: str) -> None:
    path = tmp_path / "crash.db"
    acked = []
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), sync],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            acked.append(line.strip())
            if len(acked) >= 1500:
                break
        proc.send_signal(signal.SIGKILL)
        # every line already written was acknowledged before it was printed
        acked.extend(line.strip() for line in proc.stdout)
    assert proc.returncode == -signal.SIGKILL
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        present = await node.scan("trucks/t7/")
        missing = [k for k in acked if k not in present]
        assert missing == []
        vv = await node.version_vector()
        assert vv["t7"] >= len(acked)
        # the log is intact: the chain verifies end to end on a fresh replica
        async with Node.open(tmp_path / "check.db", node_id="depot", fleet=FLEET) as check:
            while ops := await node.ops_since(await check.version_vector(), limit=5000):
                await check.apply_remote(ops)
            assert await check.state_digest() == await node.state_digest()


async def test_storage_full_under_concurrent_writers_keeps_the_log_contiguous(
    tmp_path: Path,
) -> None:
    """Pipelined batches planned on top of a batch that fails are planned again."""
    cfg = StoreConfig(max_bytes=192 * 1024)
    acked: list[str] = []
    failed = 0
    async with Node.open(tmp_path / "small.db", node_id="t7", fleet=FLEET, config=cfg) as node:

        async def writer(w: int) -> None:
            nonlocal failed
            for i in range(400):
                key = f"trucks/t7/w{w}-{i}"
                if w % 2:  # a load pattern, out of step: arrives while a batch commits
                    await asyncio.sleep(0.0005 * (w % 5))
                try:
                    await node.put(key, "y" * 300)
                except syncfw.StorageFullError:
                    failed += 1
                    continue  # keep pushing: later batches fail too, some planned in flight
                acked.append(key)

        await asyncio.gather(*(writer(w) for w in range(128)))
        assert failed > 0 and acked
        assert (await node.version_vector())["t7"] == len(acked)
        async with Node.open(tmp_path / "check.db", node_id="depot", fleet=FLEET) as check:
            while ops := await node.ops_since(await check.version_vector(), limit=2000):
                await check.apply_remote(ops)  # a gap or broken chain would raise or pend
            assert check.store.pending() == {}
            assert set(await check.scan("trucks/t7/")) == set(acked)
