"""The store and node under hard faults: one process per file, values too large for a batch,
durability by default, forks without lock-out, loud pending, integrity, budgets, small cases."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pycrdt
import pytest
from conftest import FLEET, START_MS, FakeClock, NodeFactory, exchange, hold_a_forged_op, ops_leaf

import syncfw
from syncfw import Node, StoreConfig
from syncfw.cli import main as cli_main
from syncfw.codec import encode_batch
from syncfw.log import Op, OpChain, encode_value

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


# ------------------------------------------------------------------ 2. values larger than a batch


async def test_a_value_over_the_batch_limit_is_refused_and_sync_keeps_working(
    make_node: NodeFactory,
) -> None:
    t7, depot = await make_node("t7"), await make_node("depot")
    limit = StoreConfig().max_value_bytes
    assert limit < (1 << 20) - 16 * 1024  # room for key, hashes, sig under the 1 MiB batch cap
    await t7.put("trucks/t7/before", 1)
    with pytest.raises(syncfw.ValueTooLargeError, match=f"limit of {limit} bytes") as info:
        await t7.put("trucks/t7/frame", b"x" * (limit + 1))
    assert info.value.limit == limit and info.value.size > limit
    assert isinstance(info.value, syncfw.ValueEncodingError)
    with pytest.raises(syncfw.ValueTooLargeError):
        await t7.put_many({"trucks/t7/ok": 1, "trucks/t7/big": "y" * (limit + 10)})
    with pytest.raises(syncfw.ValueTooLargeError):
        await t7.set("trucks/t7/tags").add(b"z" * (limit + 1))  # a computed payload
    with pytest.raises(syncfw.ValueTooLargeError):
        await t7.register("trucks/t7/reg").set(b"z" * (limit + 1))
    with pytest.raises(syncfw.ValueTooLargeError, match="max_key_bytes"):
        await t7.put("trucks/t7/" + "k" * 2000, 1)
    # Nothing of any refused write was written; the log moved by one op only.
    assert (await t7.version_vector())["t7"] == 1
    assert await t7.get("trucks/t7/ok") is None
    # A value at the limit still travels (its op fits one 1 MiB batch on the wire),
    # and sync keeps moving both ways.
    op = await t7.put("trucks/t7/frame", b"x" * (limit - 1024))
    assert len(encode_batch([op])) < 1 << 20
    await depot.put("site/hello", "depot")
    await exchange(t7, depot)
    assert await depot.get("trucks/t7/frame") == b"x" * (limit - 1024)
    assert await t7.get("site/hello") == "depot"


# ------------------------------------------------------------------ 3. durability by default


async def test_durability_is_full_by_default(make_node: NodeFactory) -> None:
    assert StoreConfig().synchronous == "FULL"
    node = await make_node("t7")
    rows = await node.store._read("PRAGMA synchronous")
    assert rows[0][0] == 2  # FULL
    fast = await make_node("t9", config=StoreConfig(synchronous="NORMAL"))
    assert (await fast.store._read("PRAGMA synchronous"))[0][0] == 1  # NORMAL, opted in


# ------------------------------------------------------------------ 4. forks without lock-out


async def test_a_forged_pending_op_never_locks_out_the_genuine_chain(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    t9, depot = await make_node("t9"), await make_node("depot")
    await hold_a_forged_op(t9, depot)
    with caplog.at_level(logging.WARNING, logger="syncfw.store"):
        await exchange(t9, depot)  # carries the genuine 2..5
    assert (await depot.version_vector())["t9"] == 5
    assert await depot.get("trucks/t9/k3") == 3
    assert depot.store.pending() == {}
    assert depot.store.discarded() == {"fork": 1}
    assert depot.metrics.value("syncfw_ops_discarded_total", reason="fork") == 1
    assert "fork evidence" in caplog.text
    assert await depot.state_digest() == await t9.state_digest()


# ------------------------------------------------------------------ 5. loud pending


def crafted(origin: str, n: int, *, zone: str, epoch: int, start: int = 1) -> list[Op]:
    """``n`` chained lww ops of ``origin`` from seq ``start`` (the earlier ones left out)."""
    chain = OpChain(origin)
    ops = [
        chain.mint((START_MS << 16) + i, zone, epoch, f"{zone}k{i}", "lww", encode_value(i))
        for i in range(start + n - 1)
    ]
    return ops[start - 1 :]


async def test_ops_held_for_a_missing_grant_warn_after_the_age_threshold_rate_limited(
    make_node: NodeFactory, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    depot = await make_node("depot")
    # t9 writes under an epoch of its zone this node holds no grant for.
    with caplog.at_level(logging.WARNING, logger="syncfw.store"):
        await depot.apply_remote(crafted("t9", 3, zone="trucks/t9/", epoch=5))
        assert "held back" not in caplog.text  # young and few: not yet alarming
        clock.advance(61_000)
        await depot.store.retry_pending()
        assert "3 remote ops held back (epoch) for 61 s" in caplog.text
        assert "missing grant" in caplog.text
        caplog.clear()
        clock.advance(10_000)
        await depot.store.retry_pending()
        assert "held back" not in caplog.text  # at most once a minute per reason
        clock.advance(60_000)
        await depot.store.retry_pending()
        assert "held back (epoch)" in caplog.text
    status = await depot.status()
    assert status["pending_by_reason"] == {
        "gap": 0, "epoch": 3, "clock_skew": 0, "unsigned": 0, "fork": 0, "rejected_budget": 0
    }
    assert status["metrics"]["ops_pending"]["epoch"] == 3


async def test_many_ops_behind_a_gap_warn_at_once_with_the_count(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    depot = await make_node("depot", config=StoreConfig(pending_warn_ops=10))
    with caplog.at_level(logging.WARNING, logger="syncfw.store"):
        await depot.apply_remote(crafted("t9", 12, zone="trucks/t9/", epoch=1, start=3))
    assert "12 remote ops held back (gap)" in caplog.text
    assert (await depot.status())["pending_by_reason"]["gap"] == 12


# ------------------------------------------------------------------ 6. integrity


async def inspect_check(path: Path) -> int:
    """``syncfw inspect --check PATH`` (the CLI runs its own event loop: off this one)."""
    return await asyncio.to_thread(cli_main, ["inspect", "--check", str(path)])


async def _file_with_ops(path: Path, n: int = 400) -> None:
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        await node.put_many({f"trucks/t7/k{i}": "x" * 200 for i in range(n)})


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


async def test_values_damaged_under_sqlite_are_never_served(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t7.db"
    await _file_with_ops(path)
    offset, size = ops_leaf(path)
    _overwrite(path, offset + size - 150, b"Y" * 20)  # inside an op's value: pages stay valid
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        with pytest.raises(syncfw.CorruptDatabaseError, match=r"does not name op \d+'s hash"):
            await node.ops_since({}, limit=100_000)
        async with Node.open(tmp_path / "fresh.db", node_id="depot", fleet=FLEET) as fresh:
            with pytest.raises(syncfw.CorruptDatabaseError):
                await exchange(node, fresh)
    assert await inspect_check(path) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "origin 't7': op" in out


async def test_a_damaged_page_is_refused_at_open_by_quick_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t7.db"
    await _file_with_ops(path)
    offset, _ = ops_leaf(path)
    _overwrite(path, offset + 3, b"\x00\x00")  # the page's cell count
    with pytest.raises(syncfw.CorruptDatabaseError, match="damaged"):
        await Node.open(path, node_id="t7", fleet=FLEET)
    assert await inspect_check(path) == 1
    assert "DAMAGED" in capsys.readouterr().out


async def test_a_gap_in_the_stored_log_is_an_error_not_a_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "t7.db"
    await _file_with_ops(path, 50)
    assert await inspect_check(path) == 0
    assert ": ok" in capsys.readouterr().out
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DELETE FROM ops WHERE origin = 't7' AND seq IN (20, 21)")
        conn.commit()
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        assert len(await node.ops_since({}, limit=19)) == 19  # what is whole is served
        with pytest.raises(syncfw.CorruptDatabaseError, match=r"ops 20\.\.21 are missing"):
            await node.ops_since({}, limit=100)
        with pytest.raises(syncfw.CorruptDatabaseError, match=r"ops 20\.\.21 are missing"):
            await node.ops_since({"t7": 19})
    assert await inspect_check(path) == 1
    assert "ops 20..21 are missing" in capsys.readouterr().out


# ------------------------------------------------------------------ 8. the small ones


async def test_a_doc_opened_read_only_then_writable_records_its_edits(
    make_node: NodeFactory,
) -> None:
    t7, depot = await make_node("t7"), await make_node("depot")
    ro = await t7.doc("trucks/t7/notes", readonly=True)
    doc = await t7.doc("trucks/t7/notes")
    assert doc is ro  # one live doc per key, upgraded in place
    text = doc.get("body", type=pycrdt.Text)
    text += "tyre pressure low"
    await t7.flush()
    assert (await t7.version_vector())["t7"] == 1
    await exchange(t7, depot)
    mirror = await depot.doc("trucks/t7/notes", readonly=True)
    assert str(mirror.get("body", type=pycrdt.Text)) == "tyre pressure low"


async def test_scan_finds_keys_whose_rest_starts_with_the_last_code_point(
    make_node: NodeFactory,
) -> None:
    node = await make_node("depot")
    keys = ["site/a/", "site/a/\U0010ffff", "site/a/\U0010ffffz", "site/a/\U0010ffff\U0010ffff"]
    await node.put_many({k: i for i, k in enumerate(keys)})
    await node.put("site/b", "outside")
    assert sorted(await node.scan("site/a/")) == sorted(keys)
    assert sorted(await node.scan("site/a/\U0010ffff")) == sorted(keys[1:])
    assert await node.scan("site/a/\U0010ffff\U0010ffff") == {keys[3]: 3}


@pytest.mark.parametrize("bad", ["n1/x", "*", " ", "", "a b", "x" * 257, "-n1", "n1\n"])
async def test_unsafe_node_ids_are_refused_at_open(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid node id"):
        await Node.open(tmp_path / "n.db", node_id=bad, fleet=FLEET)
    assert not (tmp_path / "n.db").exists()


async def test_safe_node_ids_open(make_node: NodeFactory, tmp_path: Path) -> None:
    for i, good in enumerate(("station-7", "t7.yard:2", "x" * 256, "truck_9@site")):
        node = await make_node(good, path=tmp_path / f"n{i}.db")
        assert node.node_id == good


def test_a_missing_tls_file_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ca.pem"
    code = cli_main([
        "node", "serve", str(tmp_path / "n.db"), "--id", "t7",
        "--listen", "127.0.0.1:0", "--ca", str(missing), "--cert", str(missing),
        "--key", str(missing),
    ])
    out = capsys.readouterr()
    assert code == 2
    assert f"cannot read TLS file {str(missing)!r}" in out.out
    assert "Traceback" not in out.out + out.err


def test_grpc_verbosity_is_set_before_grpc_is_imported() -> None:
    probe = (
        "import sys, os\n"
        "import syncfw.cli\n"
        "assert 'grpc' in sys.modules\n"
        "print(os.environ['GRPC_VERBOSITY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "NONE"
    assert out.stderr == ""


async def test_held_back_ops_are_bounded_in_bytes_and_nothing_is_lost(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # A peer can make a node hold ops behind a gap; what it holds is bounded in
    # bytes (2,000 held 64 KiB ops once cost 132 MB), the farthest ahead are
    # dropped and resent later, and when the gap fills everything applies.
    from syncfw.log import decode_value
    from syncfw.store.planner import held_bytes
    from syncfw.testing import OpWriter

    cfg = StoreConfig(max_pending_bytes=4 << 20)
    depot = await make_node("depot", config=cfg)
    w = OpWriter("t9")
    ops = [w.write(f"k{i}", os.urandom(32 << 10).hex()) for i in range(200)]  # ~64 KiB values
    with caplog.at_level(logging.WARNING, logger="syncfw.store"):
        for i in range(1, len(ops), 20):
            await depot.apply_remote(ops[i : i + 20])  # all behind the missing seq 1
    held = depot.store.pending().get("t9", {})
    assert 0 < len(held) < 199
    assert sum(held_bytes(op) for op in ops if op.seq in held) <= 4 << 20
    assert min(held) == 2  # the nearest are kept: they are the next needed
    assert depot.store.discarded()["max_pending"] == 199 - len(held)
    assert depot.metrics.value("syncfw_ops_discarded_total", reason="max_pending") > 0
    assert "max_pending_bytes" in caplog.text
    # the gap fills and the peer resends what was dropped: nothing is lost
    for i in range(0, len(ops), 20):
        await depot.apply_remote(ops[i : i + 20])
    assert (await depot.version_vector())["t9"] == 200
    assert await depot.get(ops[-1].key) == decode_value(ops[-1].value)
