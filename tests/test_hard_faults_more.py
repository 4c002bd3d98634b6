"""More hard faults on real nodes: loud pending for clock skew and gaps (the WARNING, status
and the ``syncfw_ops_pending`` gauge, and nothing lost once the cause is gone), an origin's
own zone behind a missing grant, and an op too large for any batch over a real session."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from pathlib import Path

import pytest
from conftest import FakeClock, NodeFactory, exchange

from syncfw import Node, StoreConfig
from syncfw.clock import hlc_physical
from syncfw.exchange import ExchangeOutcome, run_exchange
from syncfw.exchange.pair import SessionPair
from syncfw.mesh import MeshConfig
from syncfw.sync import SessionConfig, Status
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.ops import OpWriter
from syncfw.transport.rpc import ChannelPool, TransportConfig
from syncfw.zones import Fleet, Grant

HOUR_MS = 3_600_000
ALL_ZERO = {"gap": 0, "epoch": 0, "clock_skew": 0, "unsigned": 0, "fork": 0, "rejected_budget": 0}


def pending_gauge(node: Node, reason: str) -> float:
    """``syncfw_ops_pending{reason}`` as ``/metrics`` shows it."""
    return node.metrics.value("syncfw_ops_pending", reason=reason)


async def resend(src: Node, dst: Node) -> None:
    """One pass of what an exchange sends: ``src``'s ops beyond ``dst``'s vector (no loop
    until in sync, so ops that stay held fail the test rather than spin it)."""
    await dst.apply_remote(await src.ops_since(await dst.version_vector()))


# ------------------------------------------------------------------ 1. clock skew, gaps


async def test_ops_stamped_beyond_the_allowed_skew_are_held_loudly_until_time_catches_up(
    make_node: NodeFactory, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # t9's clock runs an hour ahead: its ops are stamped far beyond max_offset_ms.
    t9 = await make_node("t9", wall=lambda: clock() + HOUR_MS)
    depot = await make_node("depot")
    assert depot.store.clock.max_offset_ms == StoreConfig().max_offset_ms == 500
    for i in range(3):
        await t9.put(f"trucks/t9/k{i}", i)
    with caplog.at_level(logging.WARNING, logger="syncfw.store"):
        got = await depot.apply_remote(await t9.ops_since({}))
        assert (got.applied, got.pending) == (0, 3)
        assert "held back" not in caplog.text  # young and few: not yet alarming
        clock.advance(61_000)
        await depot.store.retry_pending()  # still an hour behind t9's stamps
    assert "3 remote ops held back (clock_skew) for 61 s" in caplog.text
    assert "ahead of local time by more than max_offset_ms" in caplog.text
    held = depot.store.pending()["t9"]
    assert sorted(held) == [1, 2, 3]
    assert all(w.startswith("clock skew") and "max_offset is 500 ms" in w for w in held.values())
    status = await depot.status()
    assert status["pending_by_reason"] == {**ALL_ZERO, "clock_skew": 3}
    assert status["metrics"]["ops_pending"]["clock_skew"] == 3
    assert status["pending"] == 3
    assert pending_gauge(depot, "clock_skew") == 3
    assert "t9" not in await depot.version_vector()
    assert await depot.get("trucks/t9/k0") is None
    # Held ops are not observed: the depot's own clock did not jump an hour ahead.
    assert hlc_physical(status["hlc"]) <= clock()
    mine = await depot.put("site/depot", "own write")
    assert hlc_physical(mine.hlc) <= clock()

    # True time catches up; the next exchange resends the ops and they apply, all of them.
    clock.advance(HOUR_MS)
    await resend(t9, depot)
    assert (await depot.version_vector())["t9"] == 3
    assert [await depot.get(f"trucks/t9/k{i}") for i in range(3)] == [0, 1, 2]
    assert depot.store.pending() == {}
    status = await depot.status()
    assert status["pending_by_reason"] == ALL_ZERO
    assert pending_gauge(depot, "clock_skew") == 0
    assert depot.store.discarded() == {}
    await resend(depot, t9)  # the other half of the exchange: the depot's own write
    assert await depot.state_digest() == await t9.state_digest()


async def test_ops_held_for_clock_skew_survive_a_restart_and_apply_under_a_raised_limit(
    make_node: NodeFactory, clock: FakeClock, tmp_path: Path
) -> None:
    t9 = await make_node("t9", wall=lambda: clock() + HOUR_MS)
    path = tmp_path / "depot.db"
    depot = await make_node("depot", path=path)
    for i in range(4):
        await t9.put(f"trucks/t9/k{i}", i)
    await depot.apply_remote(await t9.ops_since({}))
    assert (await depot.status())["pending_by_reason"]["clock_skew"] == 4
    await depot.close()
    # The operator raises the allowed skew (a fleet whose clocks are known to drift).
    depot = await make_node("depot", path=path, config=StoreConfig(max_offset_ms=2 * HOUR_MS))
    assert sorted(depot.store.pending().get("t9", {})) == [1, 2, 3, 4]  # held across the restart
    assert pending_gauge(depot, "clock_skew") == 4
    got = await depot.store.retry_pending()  # no peer needed: the held ops are re-judged
    assert got.applied == 4 and got.pending == 0
    assert (await depot.version_vector())["t9"] == 4
    assert await depot.get("trucks/t9/k3") == 3
    assert (await depot.status())["pending_by_reason"] == ALL_ZERO
    assert pending_gauge(depot, "clock_skew") == 0
    assert await depot.state_digest() == await t9.state_digest()


async def test_ops_behind_a_gap_are_in_the_pending_gauge_until_the_gap_fills(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    t9 = await make_node("t9")
    depot = await make_node("depot", config=StoreConfig(pending_warn_ops=10))
    for i in range(14):
        await t9.put(f"trucks/t9/k{i}", i)
    ops = await t9.ops_since({})
    with caplog.at_level(logging.WARNING, logger="syncfw.store"):
        got = await depot.apply_remote(ops[2:])  # seqs 1..2 lost on the way
    assert got.pending == 12
    assert "12 remote ops held back (gap)" in caplog.text
    status = await depot.status()
    assert status["pending_by_reason"] == {**ALL_ZERO, "gap": 12}
    assert status["metrics"]["ops_pending"] == {
        "gap": 12, "epoch": 0, "clock_skew": 0, "unsigned": 0, "fork": 0
    }
    assert pending_gauge(depot, "gap") == 12
    got = await depot.apply_remote(ops[:2])  # the gap fills: everything held applies
    assert got.applied == 14 and got.pending == 0
    assert pending_gauge(depot, "gap") == 0
    assert (await depot.status())["pending_by_reason"] == ALL_ZERO
    assert await depot.state_digest() == await t9.state_digest()


# ------------------------------------------------------------------ 2. own zone, missing grant


async def test_own_zone_ops_behind_a_missing_grant_are_held_loudly_never_silently(
    make_node: NodeFactory, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    cloud, t7, depot = await make_node("cloud"), await make_node("t7"), await make_node("depot")
    grant = await cloud.grant("trucks/t7/", "t7")  # epoch 2 of t7's truck zone
    await exchange(cloud, t7)  # t7 knows the grant; the depot does not yet
    first = await t7.put("fleet/t7/a", "own zone, first")
    granted = await t7.put("trucks/t7/pos", "granted zone")
    after = await t7.put("fleet/t7/b", "own zone, after")
    assert (first.zone, first.epoch) == ("fleet/t7/", 0)
    assert (granted.zone, granted.epoch) == ("trucks/t7/", 2)
    assert (after.zone, after.epoch, after.seq) == ("fleet/t7/", 0, 3)
    with caplog.at_level(logging.WARNING, logger="syncfw.store"):
        got = await depot.apply_remote(await t7.ops_since({"cloud": grant.seq}))
        # An own-zone op needs no grant: the one before the missing grant applies at once.
        assert (got.applied, got.pending) == (1, 2)
        assert await depot.get("fleet/t7/a") == "own zone, first"
        # The own-zone op after it cannot skip its origin's chain: it is held, and the
        # hold names the missing grant it waits for.
        assert depot.store.pending() == {
            "t7": {
                2: "zone 'trucks/t7/' epoch 2 not known yet",
                3: "zone 'trucks/t7/' epoch 2 not known yet",
            }
        }
        assert await depot.get("fleet/t7/b") is None
        clock.advance(61_000)
        await depot.store.retry_pending()
    assert "2 remote ops held back (epoch) for 61 s" in caplog.text
    assert "no grant for" in caplog.text
    status = await depot.status()
    assert status["pending_by_reason"] == {**ALL_ZERO, "epoch": 2}
    assert status["metrics"]["ops_pending"]["epoch"] == 2
    assert pending_gauge(depot, "epoch") == 2
    # The grant arrives: both held ops apply, the own-zone one included.
    await exchange(cloud, depot)
    assert await depot.get("trucks/t7/pos") == "granted zone"
    assert await depot.get("fleet/t7/b") == "own zone, after"
    assert (await depot.version_vector())["t7"] == 3
    assert (await depot.status())["pending_by_reason"] == ALL_ZERO
    assert pending_gauge(depot, "epoch") == 0


# ------------------------------------------------------------------ 3. an op too large to send


async def _sync(node: Node, address: str, config: SessionConfig | None = None) -> ExchangeOutcome:
    pool = ChannelPool(TransportConfig.test(connect_timeout_s=2.0), metrics=node.metrics)
    try:
        return await run_exchange(
            node, await pool.open(address), config=config, metrics=node.metrics,
            initiator=True, timeout_s=10.0,
        )
    finally:
        await pool.aclose()


async def test_an_op_too_large_for_any_batch_stalls_only_its_origin_and_says_so_over_grpc(
    make_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A file written before the value limit holds an op no 1 MiB batch can carry.
    path = tmp_path / "t7.db"
    old = await make_node("t7", path=path, config=StoreConfig(max_value_bytes=2 << 20))
    big = os.urandom(1_200_000)  # incompressible: zstd cannot squeeze it under the cap
    await old.put("trucks/t7/a", 1)
    stuck = await old.put("trucks/t7/big", big)
    await old.put("trucks/t7/after", 3)
    await old.close()
    t7 = await make_node("t7", path=path)  # reopened under the default limit
    assert await t7.get("trucks/t7/big") == big
    t9 = await make_node("t9")
    await t9.put("trucks/t9/x", "relayed by t7")
    await exchange(t9, t7)
    depot = await make_node("depot")
    await depot.put("site/news", "from the depot")
    # The depot could take 2 MiB batches; t7's own 1 MiB cap is the one in force first.
    wide = SessionConfig(max_batch_bytes=2 << 20)
    mesh = await depot.serve(
        "127.0.0.1:0", config=dataclasses.replace(MeshConfig.test(), session=wide)
    )

    with caplog.at_level(logging.WARNING, logger="syncfw.sync"):
        out = await _sync(t7, mesh.address)
    assert out.status is Status.RESOURCE_EXHAUSTED, out
    assert f"op (t7, {stuck.seq}) of " in out.reason and "batch cap of 1048576 bytes" in out.reason
    # Everything else moved, both ways: t7's ops before the stuck one, the op it
    # relays for t9, and the depot's own.
    assert (await depot.version_vector()).get("t7") == stuck.seq - 1
    assert await depot.get("trucks/t7/a") == 1
    assert await depot.get("trucks/t9/x") == "relayed by t7"
    assert await t7.get("site/news") == "from the depot"
    assert out.ops_received == 1 and out.ops_sent == 2
    # ...and it is said: a WARNING naming the op, the exchange counted by its outcome.
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "ended RESOURCE_EXHAUSTED" in m and f"op (t7, {stuck.seq})" in m for m in warned
    ), warned
    assert (await t7.status())["metrics"]["exchanges"] == {"RESOURCE_EXHAUSTED": 1}

    # Later writes: the origin stays stuck at the same op, and says so every time;
    # the other traffic keeps flowing.
    await t7.put("trucks/t7/later", 4)
    await depot.put("site/news", "later news")
    out = await _sync(t7, mesh.address)
    assert out.status is Status.RESOURCE_EXHAUSTED and f"op (t7, {stuck.seq})" in out.reason
    assert await t7.get("site/news") == "later news"
    assert (await depot.version_vector()).get("t7") == stuck.seq - 1
    assert (await t7.status())["metrics"]["exchanges"] == {"RESOURCE_EXHAUSTED": 2}

    # Once both sides take batches that large, the op is carried and the rest of the
    # origin follows: nothing was lost.
    out = await _sync(t7, mesh.address, config=wide)
    assert out.status is Status.OK, out
    assert (await depot.version_vector())["t7"] == (await t7.version_vector())["t7"] == 4
    assert await depot.get("trucks/t7/big") == big
    assert await depot.get("trucks/t7/later") == 4
    assert await depot.state_digest() == await t7.state_digest()


def test_a_peer_with_a_smaller_batch_cap_still_gets_every_other_origin() -> None:
    # A metered link's 256 KiB batches: an ordinary 300 KB value stalls its own origin
    # only. The pair runs the real sessions and performers in lockstep.
    fleet = Fleet(fleet_id="caps", authority="cloud", grants=(Grant.of("shared/", "*"),))
    src, metered = MemoryReplica("src", fleet), MemoryReplica("metered", fleet)
    a, b = OpWriter("a"), OpWriter("b")
    ops = [a.write("a1", 1), a.write("a2", os.urandom(300_000)), a.write("a3", 3)]
    ops += [b.write(f"b{i}", i) for i in range(5)]
    asyncio.run(src.apply_remote(ops))
    src.put("fleet/src/own", "own")
    metered.put("fleet/metered/own", "metered")
    small = SessionConfig(max_batch_bytes=256 * 1024)
    res = SessionPair(src, metered, config_b=small).run()
    assert res.a is not None and res.a[0] is Status.RESOURCE_EXHAUSTED, res.a
    assert "op (a, 2) of " in res.a[1] and "batch cap of 262144 bytes" in res.a[1]
    assert metered.vv() == {"a": 1, "b": 5, "src": 1, "metered": 1}
    assert src.get("fleet/metered/own") == "metered"
    assert metered.get("fleet/b/b4") == 4
