"""Hostile peers and hard faults over the real protocol: real nodes on real SQLite files,
exchanging over gRPC on loopback (``Node.serve`` on one side, ``run_exchange`` through a
``ChannelPool`` on the other), each outcome read from both ends.

The in-process ``conftest.exchange`` loop (``ops_since`` -> ``apply_remote``) shows what the
store does; these show what a peer sees: a damaged file never tells a peer it is in sync
(nor hands it a damaged value), a forged pending op never turns a genuine exchange into
``DATA_LOSS``, an older backup's fence lifts through a real exchange, and a peer's
``Close(OK)`` before the vectors were compared is counted ``ABORTED``. The last test holds
the README's operations section to stating the per-peer bounds with numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import sqlite3
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    FLEET,
    NodeFactory,
    hold_a_forged_op,
    ops_leaf,
    raw_exchange,
    restore_older_backup,
)

from syncfw import ChainFencedError
from syncfw.exchange import ExchangeOutcome, run_exchange
from syncfw.log import decode_value, op_hash
from syncfw.mesh import MeshConfig
from syncfw.node import Node
from syncfw.sync import PROTOCOL_VERSION, Close, Digest, Hello, SessionConfig, Status, Summary
from syncfw.testing.waiting import wait_until
from syncfw.transport.rpc import ChannelPool, TransportConfig
from syncfw.transport.wire import encode_frame

README = Path(__file__).resolve().parent.parent / "README.md"
VALUE = "x" * 200


async def dial(node: Node, address: str) -> ExchangeOutcome:
    """One exchange ``node`` starts with the node serving ``address`` (its outcome, any status)."""
    pool = ChannelPool(TransportConfig.test(connect_timeout_s=2.0), metrics=node.metrics)
    try:
        return await run_exchange(
            node, await pool.open(address), metrics=node.metrics, initiator=True, timeout_s=10.0
        )
    finally:
        await pool.aclose()


async def exchanges(node: Node) -> dict[str, int]:
    """The node's exchanges by outcome, as ``status()`` reports them."""
    return dict((await node.status())["metrics"]["exchanges"])


async def served(node: Node, counts: dict[str, int]) -> None:
    """Wait until the serving side has recorded its outcomes (the dialer's call can end first)."""

    async def done() -> bool:
        return await exchanges(node) == counts

    try:
        await wait_until(done, what=f"{node.node_id}'s exchanges to be {counts}", timeout_s=8.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; they are {await exchanges(node)}") from None


def warnings_of(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.getMessage().startswith(start)
    ]


# ------------------------------------------------------------------ 1. a damaged file


async def test_a_peer_syncing_from_a_damaged_file_is_never_told_it_is_in_sync(
    make_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "t7.db"
    t7 = await make_node("t7", path=path)
    await t7.put_many({f"trucks/t7/k{i:03}": VALUE for i in range(400)})
    await t7.close()
    offset, size = ops_leaf(path)
    raw = bytearray(path.read_bytes())
    raw[offset + size - 150 : offset + size - 130] = b"Y" * 20  # inside a value: pages stay valid
    path.write_bytes(bytes(raw))
    t7 = await make_node("t7", path=path)
    assert (await t7.version_vector())["t7"] == 400  # the damage is not seen at open
    mesh = await t7.serve("127.0.0.1:0", config=MeshConfig.test())
    fresh = await make_node("depot")

    with caplog.at_level(logging.WARNING, logger="syncfw"):
        out = await dial(fresh, mesh.address)
        await served(t7, {"INTERNAL": 1})
    # The peer is told why, and it is not "OK: synced".
    assert out.status is Status.INTERNAL, out
    assert "the log of origin 't7' is damaged" in out.reason
    # The damaged node says so: a WARNING naming the damage, its exchanges by outcome.
    said = warnings_of(caplog, "exchange t7 <-> depot")
    assert any(
        "ended INTERNAL" in m and "is damaged" in m and "syncfw inspect --check" in m for m in said
    ), said
    assert await exchanges(t7) == {"INTERNAL": 1}
    assert t7.metrics.value("syncfw_exchanges_total", outcome="OK") == 0
    assert await exchanges(fresh) == {"INTERNAL": 1}
    # The peer does not believe itself in sync: it holds less than the damaged node's
    # vector, nothing from the damaged op on, and only intact values.
    found = re.search(r"op (\d+) does not name op (\d+)'s hash", out.reason)
    assert found, out.reason
    damaged = int(found[2])
    got = (await fresh.version_vector()).get("t7", 0)
    assert got < damaged < 400
    held = await fresh.scan("trucks/t7/")
    assert len(held) == got and all(v == VALUE for v in held.values())
    # ...and asking again does not make it so.
    again = await dial(fresh, mesh.address)
    assert again.status is Status.INTERNAL and "is damaged" in again.reason, again
    assert (await fresh.version_vector()).get("t7", 0) < damaged
    assert all(v == VALUE for v in (await fresh.scan("trucks/t7/")).values())
    await served(t7, {"INTERNAL": 2})
    assert await exchanges(fresh) == {"INTERNAL": 2}


async def test_an_op_damaged_at_the_end_of_a_batch_is_never_handed_to_a_peer(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    # A batch that ends at the op batch_ops allows must check that op too: its own
    # prev link is intact, only the next op's prev (or the chain head) can tell.
    path = tmp_path / "t7.db"
    t7 = await make_node("t7", path=path)
    await t7.put_many({f"trucks/t7/k{i:03}": VALUE for i in range(60)})
    await t7.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:  # bit rot in op 40's value
        (value,) = conn.execute("SELECT value FROM ops WHERE origin = 't7' AND seq = 40").fetchone()
        rotten = bytes(value)[:-20] + b"Y" * 20
        assert decode_value(rotten) != VALUE  # still decodes: only the hashes can tell
        conn.execute("UPDATE ops SET value = ? WHERE origin = 't7' AND seq = 40", (rotten,))
        conn.commit()
    t7 = await make_node("t7", path=path)
    # Batches of 20 ops, never cut by bytes (20 such ops are ~6 KB): 1..20, 21..40, ...
    batches = SessionConfig(batch_ops=20, first_batch_bytes=256 << 10, min_batch_bytes=256 << 10)
    mesh = await t7.serve(
        "127.0.0.1:0", config=dataclasses.replace(MeshConfig.test(), session=batches)
    )
    fresh = await make_node("depot")

    async def pull() -> int:
        out = await dial(fresh, mesh.address)
        assert out.status is Status.INTERNAL, out
        assert "op 41 does not name op 40's hash" in out.reason, out
        held = await fresh.scan("trucks/t7/")
        assert all(v == VALUE for v in held.values()), "a damaged value was handed over"
        got = (await fresh.version_vector()).get("t7", 0)
        assert len(held) == got
        return got

    # The first batch is whole and checked, so it goes; nothing of the one that ends at
    # the damaged op does. (A batch can also be left unapplied when the node's Close
    # overtakes the peer's last send: then the next exchange brings it.)
    for _ in range(10):
        if (got := await pull()) == 20:
            break
        assert got == 0
    assert got == 20
    for _ in range(3):  # and never more, however often it asks
        assert await pull() == 20


# ------------------------------------------------------------------ 2. a forged pending op


async def test_a_forged_pending_op_never_turns_a_genuine_exchange_into_data_loss(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    t9, depot = await make_node("t9"), await make_node("depot")
    await hold_a_forged_op(t9, depot)
    mesh = await depot.serve("127.0.0.1:0", config=MeshConfig.test())

    with caplog.at_level(logging.WARNING, logger="syncfw"):
        out = await dial(t9, mesh.address)  # carries the genuine 2..5
        await served(depot, {"OK": 1})
    assert out.status is Status.OK, out
    assert out.ops_sent == 4
    assert (await depot.version_vector())["t9"] == 5
    assert [await depot.get(f"trucks/t9/k{i}") for i in range(5)] == [0, 1, 2, 3, 4]
    assert depot.store.pending() == {}
    # the forged copy is fork evidence: discarded, counted and warned
    status = await depot.status()
    assert status["discarded"] == {"fork": 1}
    assert depot.metrics.value("syncfw_ops_discarded_total", reason="fork") == 1
    assert 'syncfw_ops_discarded_total{node="depot",reason="fork"} 1.0' in (
        depot.metrics.exposition().decode()
    )
    assert any("fork evidence" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not warnings_of(caplog, "exchange")  # neither side's exchange failed
    # the next exchanges are OK too, and nothing is left to tell apart
    await t9.put("trucks/t9/k5", 5)
    assert (await dial(t9, mesh.address)).status is Status.OK
    await served(depot, {"OK": 2})
    assert await exchanges(t9) == {"OK": 2}
    assert await depot.get("trucks/t9/k5") == 5
    assert await depot.state_digest() == await t9.state_digest()


# ------------------------------------------------------------------ 3. an older backup restored


@pytest.mark.parametrize("restored_serves", [False, True], ids=["restored-dials", "depot-dials"])
async def test_an_older_backup_restored_is_fenced_until_a_real_exchange_relays_its_ops(
    make_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, restored_serves: bool
) -> None:
    path = tmp_path / "t7.db"
    depot = await make_node("depot")
    depot_mesh = await depot.serve("127.0.0.1:0", config=MeshConfig.test())

    async def hand_to_depot(t7: Node) -> None:
        assert (await dial(t7, depot_mesh.address)).status is Status.OK
        assert (await depot.version_vector())["t7"] == 150

    # the operator's backup is taken at seq 10 and restored after seq 150
    t7 = await restore_older_backup(
        make_node, path, "t7", backed_up=10, written=150, after_writes=hand_to_depot
    )
    with pytest.raises(ChainFencedError, match=r"11\.\.150"):
        await t7.put("fleet/t7/k", "after the restore")
    assert (await t7.status())["metrics"]["chain_fenced"] == 150

    # the restored node serves (the depot dials it), or dials the depot
    t7_mesh = await t7.serve("127.0.0.1:0", config=MeshConfig.test()) if restored_serves else None

    async def sync() -> tuple[ExchangeOutcome, Node]:
        """One exchange between the two; the dialer's outcome and the serving node."""
        if t7_mesh is not None:
            return await dial(depot, t7_mesh.address), t7
        return await dial(t7, depot_mesh.address), depot

    with caplog.at_level(logging.WARNING, logger="syncfw"):
        out, server = await sync()  # the depot relays t7's own ops back; the fence lifts
        await served(server, {"OK": 2} if server is depot else {"OK": 1})
    assert out.status is Status.OK, out
    assert not any("DATA_LOSS" in m for m in warnings_of(caplog, "exchange"))
    assert "own chain is back to seq 150; local writes resume" in caplog.text
    assert (await t7.version_vector())["t7"] == 150
    assert await t7.get("fleet/t7/k") == 149
    assert (await t7.status())["metrics"]["chain_fenced"] == 0
    op = await t7.put("fleet/t7/k", "after the restore")  # the chain goes on from 150
    assert op.seq == 151
    assert op.prev == op_hash((await depot.ops_since({"t7": 149}))[0])
    out, _ = await sync()
    assert out.status is Status.OK, out
    assert (await depot.version_vector())["t7"] == 151
    assert await depot.get("fleet/t7/k") == "after the restore"
    assert depot.store.pending() == {} and depot.store.discarded() == {}
    assert "DATA_LOSS" not in await exchanges(t7) and "DATA_LOSS" not in await exchanges(depot)
    assert await t7.state_digest() == await depot.state_digest()


# ------------------------------------------------------------------ 4. truthful outcomes


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def exchanges_scraped(text: str, node_id: str) -> dict[str, float]:
    pat = rf'^syncfw_exchanges_total\{{node="{re.escape(node_id)}",outcome="(\w+)"\}} (\S+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pat, text, re.MULTILINE)}


@pytest.mark.parametrize("after_summary", [False, True], ids=["after-hello", "after-summary"])
async def test_close_ok_before_the_vectors_were_compared_counts_as_aborted_on_the_node(
    make_node: NodeFactory, after_summary: bool
) -> None:
    node = await make_node("b")
    await node.put("site/b", 1)
    mesh = await node.serve("127.0.0.1:0", config=MeshConfig.test())
    web = node.serve_metrics("127.0.0.1:0")
    hello = Hello(PROTOCOL_VERSION, FLEET.fleet_id, "evil", fleet_digest=FLEET.bootstrap_digest())
    frames = [encode_frame(hello)]
    if after_summary:
        frames += [encode_frame(Digest(b"\x01" * 16)), encode_frame(Summary({}))]
    frames.append(encode_frame(Close(Status.OK, "all good, honest")))
    await raw_exchange(mesh.address, frames, timeout_s=10)
    await served(node, {"ABORTED": 1})
    assert node.metrics.value("syncfw_exchanges_total", outcome="OK") == 0
    text = await asyncio.to_thread(scrape, web.address)
    assert exchanges_scraped(text, "b") == {"ABORTED": 1.0}
    assert (await node.version_vector()) == {"b": 1}
    # An honest peer's exchange is the one that counts OK.
    honest = await make_node("t9")
    assert (await dial(honest, mesh.address)).status is Status.OK
    await served(node, {"ABORTED": 1, "OK": 1})
    text = await asyncio.to_thread(scrape, web.address)
    assert exchanges_scraped(text, "b") == {"ABORTED": 1.0, "OK": 1.0}


async def test_a_peer_that_only_pulls_is_counted_ok_on_the_node_it_pulled_from(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # The dialer is in sync as soon as it has applied and acknowledged the last batch;
    # the serving node still has that ack to read and persist. The dialer's end must
    # not cancel the call under it (the node once counted such an exchange CANCELLED).
    depot = await make_node("depot")
    await depot.put_many({f"site/k{i}": i for i in range(30)})
    mesh = await depot.serve("127.0.0.1:0", config=MeshConfig.test())
    with caplog.at_level(logging.INFO, logger="syncfw.sync"):
        for n in range(3):
            edge = await make_node(f"e{n}")
            out = await dial(edge, mesh.address)
            assert out.status is Status.OK and out.ops_received == 30, out
            await served(depot, {"OK": n + 1})
            assert await depot.peer_ack(f"e{n}") == {"depot": 30}
    ended = [m for m in (r.getMessage() for r in caplog.records) if " ended " in m]
    assert not ended, ended  # an OK exchange logs at DEBUG only, on both sides


# ------------------------------------------------------------------ 5. the README's bounds


BYTES = r"\d[\d,]*(?:\.\d+)?\s*(?:bytes|B|KB|KiB|MB|MiB|GB|GiB)\b"


def _hostile_bounds() -> dict[str, str]:
    """The items of the operations section's per-peer bounds, by their *label*."""
    text = README.read_text(encoding="utf-8")
    ops = re.search(r"^## Operations\n(.*?)^## ", text, re.MULTILINE | re.DOTALL)
    assert ops, "README.md has no '## Operations' section"
    section = ops[1]
    head = re.search(r"^- \*\*What one hostile peer can cost\*\*.*?(?=^- |\Z)", section,
                     re.MULTILINE | re.DOTALL)
    assert head, "the operations section has no 'What one hostile peer can cost' list"
    items = re.findall(r"^  - \*([^*]+)\*:?(.*?)(?=^  - |\Z)", head[0], re.MULTILINE | re.DOTALL)
    return {label.strip().lower(): " ".join(body.split()) for label, body in items}


def _sentences(body: str) -> list[str]:
    return re.split(r"(?<=[.;])\s+(?=[A-Z(`*])", body)


def _states_rss(items: dict[str, str]) -> bool:
    rss = next((b for label, b in items.items() if "rss" in label), "")
    return bool(re.search(r"(?:at most|under|below|up to|<|≤)\s*" + BYTES, rss))


def _states_bytes_per_rejection(items: dict[str, str]) -> bool:
    # One refusal's cost in bytes: a sentence of the per-refusal item that gives a size,
    # other than the store's budget for all rejected ops together (max_rejected_bytes).
    body = next((b for label, b in items.items() if "refus" in label or "reject" in label), "")
    return any(re.search(BYTES, s) and "max_rejected_bytes" not in s for s in _sentences(body))


def _states_log_rate(items: dict[str, str]) -> bool:
    logs = next((b for label, b in items.items() if label.startswith("log")), "")
    return bool(re.search(BYTES + r"\s*(?:per second|/\s*s\b)[^.;]*per peer", logs))


@pytest.mark.parametrize(
    "bound",
    [
        pytest.param(_states_rss, id="rss-per-peer"),
        pytest.param(_states_bytes_per_rejection, id="bytes-per-rejection"),
        pytest.param(_states_log_rate, id="log-bytes-per-second-per-peer"),
    ],
)
def test_the_readme_states_each_per_peer_bound_with_a_number_and_unit(
    bound: Callable[[dict[str, str]], bool],
) -> None:
    items = _hostile_bounds()
    assert items, "no bounds listed under 'What one hostile peer can cost'"
    assert bound(items), f"README.md's operations section does not state it (items: {sorted(items)})"
