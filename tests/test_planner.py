"""The apply planner: verdicts are per op, whatever batch an op arrives in."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncfw import Fleet, Grant, Node
from syncfw.errors import ChainError, ClockError, DecodeError, ForkError
from syncfw.log import GENESIS, Op, OpChain, encode_value, op_hash
from syncfw.store.local import WriteSpec, plan_local
from syncfw.store.planner import (
    HLC_LIMIT,
    Mirrors,
    Outcome,
    RemoteLimits,
    plan_remote,
    triage,
)
from syncfw.zones import ZoneTable

START_MS = 1_790_000_000_000
T0 = START_MS << 16

# shared/ is everyone's; shared/locked/ (nested, from the bootstrap) only n1's.
FLEET = Fleet(
    fleet_id="planner",
    authority="cloud",
    grants=(Grant.of("shared/", "*"), Grant.of("shared/locked/", "n1")),
)
LIM = RemoteLimits(wall_ms=START_MS, max_offset_ms=500, max_pending=100_000, authority="cloud")

# What an op of a writer may be: (zone, key, epoch) templates.
SHAPES: dict[str, tuple[str, str, int]] = {
    "valid": ("shared/", "shared/k{i}", 1),
    "sub_zone": ("shared/", "shared/locked/k{i}", 1),  # names the less specific zone
    "locked": ("shared/locked/", "shared/locked/k{i}", 1),  # only n1 owns it
    "outside": ("shared/locked/", "shared/k{i}", 1),  # key outside the named zone
    "epoch0": ("shared/", "shared/k{i}", 0),  # shared/ has no epoch 0
    "epoch2": ("shared/", "shared/k{i}", 2),  # waits until cloud grants epoch 2
    "own": ("fleet/{o}/", "fleet/{o}/k{i}", 0),
    "foreign": ("fleet/n9/", "fleet/n9/k{i}", 0),
}


def build(plan: list[tuple[str, str, int]]) -> list[Op]:
    """Chains of crafted ops: ``(origin, shape, i)`` in order; cloud grants epoch 2."""
    chains: dict[str, OpChain] = {}
    ops: list[Op] = []
    for n, (origin, shape, i) in enumerate(plan):
        chain = chains.setdefault(origin, OpChain(origin))
        if origin == "cloud":
            value = encode_value({"prefix": "shared/", "owners": ["n1"], "epoch": 2})
            ops.append(chain.mint(T0 + n, "sys/", 0, "sys/zones/shared/", "grant", value))
            continue
        zone, key, epoch = SHAPES[shape]
        ops.append(chain.mint(T0 + n, zone.format(o=origin), epoch, key.format(o=origin, i=i),
                              "lww", encode_value([origin, n])))
    return ops


# "valid" weighs more: the sub-zone bug showed only behind valid ops of the same origin.
crafted = st.lists(
    st.tuples(
        st.sampled_from(["n1", "n2", "n3"]),
        st.sampled_from(["valid"] * 4 + sorted(SHAPES)),
        st.integers(0, 2),
    )
    | st.just(("cloud", "grant", 0)),
    min_size=1,
    max_size=30,
).map(lambda p: [x for k, x in enumerate(p) if x[0] != "cloud" or ("cloud", "grant", 0) not in p[:k]])


@st.composite
def batchings(draw: st.DrawFn, n: int) -> list[list[list[int]]]:
    """Three deliveries of ``range(n)``: all at once, one by one, random splits (random orders)."""
    out = [[list(draw(st.permutations(range(n))))]]
    out.append([[i] for i in draw(st.permutations(range(n)))])
    order = draw(st.permutations(range(n)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=n)))
    bounds = [0, *[c for c in cuts if c < n], n]
    out.append([list(order[a:b]) for a, b in itertools.pairwise(bounds) if a < b])
    return out


class Replay:
    """A store without SQLite: plans applied to dict mirrors, as the store does after COMMIT."""

    def __init__(self) -> None:
        self.vv: dict[str, int] = {}
        self.heads: dict[str, bytes] = {}
        self.pending: Any = {}
        self.zones = ZoneTable(FLEET)
        self.stored: dict[tuple[str, int], Op] = {}
        self.rejected: dict[tuple[str, int], str] = {}
        self.lww: dict[str, tuple[int, str, bytes]] = {}

    def apply(self, ops: list[Op]) -> None:
        m = Mirrors(self.vv, self.heads, self.pending, self.zones)
        t = triage(ops, m)
        plan = plan_remote(t, m, {op.id: self.stored[op.id] for op in t.held}, {}, LIM)
        for op in plan.applied:
            self.stored[op.id] = op
        for op, why in plan.rejected:
            self.stored[op.id] = op
            self.rejected[op.id] = why
        for step_sql, rows in plan.steps:
            if step_sql.startswith("INSERT INTO state"):
                for key, hlc, origin, data in rows:
                    cur = self.lww.get(key)
                    if cur is None or (hlc, origin, data) > cur:
                        self.lww[key] = (hlc, origin, data)
        self.vv.update(plan.vv)
        self.heads.update(plan.heads)
        self.pending = plan.pending
        if plan.zones is not None:
            self.zones = plan.zones


@settings(max_examples=300, deadline=None)
@given(data=st.data(), shape=crafted)
def test_pure_planner_verdicts_do_not_depend_on_batching(data: st.DataObject, shape: list[Any]) -> None:
    ops = build(shape)
    outcomes = []
    for deliveries in data.draw(batchings(len(ops))):
        r = Replay()
        for batch in deliveries:
            r.apply([ops[i] for i in batch])
        outcomes.append((r.vv, r.rejected, r.lww, {o: set(d) for o, d in r.pending.items()}))
    assert all(o == outcomes[0] for o in outcomes)
    # every crafted sub-zone op is rejected, however it travelled
    vv, rejected = outcomes[0][0], outcomes[0][1]
    for op in ops:
        if op.zone == "shared/" and op.key.startswith("shared/locked/") and op.seq <= vv.get(op.origin, 0):
            assert "less specific" in rejected[op.id]


def test_sub_zone_op_is_rejected_behind_valid_ops_of_its_origin() -> None:
    """The memo bug: shared/ ops first, then one naming shared/ for shared/locked/k0."""
    ops = build([("n2", "valid", 0), ("n2", "valid", 1), ("n2", "sub_zone", 0)])
    alone, together = Replay(), Replay()
    together.apply(ops)
    alone.apply(ops[:2])
    alone.apply(ops[2:])
    assert together.rejected == alone.rejected
    assert "less specific" in together.rejected[("n2", 3)]
    assert "shared/locked/k0" not in together.lww


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), shape=crafted)
async def test_store_verdicts_and_digest_do_not_depend_on_batching(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, shape: list[Any]
) -> None:
    ops = build(shape)
    seen = set()
    for deliveries in data.draw(batchings(len(ops))):
        path = tmp_path_factory.mktemp("p") / "n.db"
        async with Node.open(path, node_id="depot", fleet=FLEET, clock=lambda: START_MS) as node:
            for batch in deliveries:
                await node.apply_remote([ops[i] for i in batch])
            rejected = tuple(await node.store.rejected())
            seen.add((rejected, await node.state_digest(), tuple(sorted(node.store.version_vector.items()))))
    assert len(seen) == 1


def mirrors() -> Mirrors:
    return Mirrors({}, {}, {}, ZoneTable(FLEET))


def test_verdicts_name_each_outcome() -> None:
    ops = build([("n2", "valid", 0), ("n2", "locked", 0), ("n2", "epoch2", 0), ("n2", "valid", 1)])
    gap = build([("n3", "valid", 0), ("n3", "valid", 1)])[1:]
    m = mirrors()
    batch = [*ops, dataclasses.replace(ops[0]), *gap]
    plan = plan_remote(triage(batch, m), m, {}, {}, LIM)
    got = [(v.op, v.outcome) for v in plan.verdicts(batch)]
    assert got == [
        (("n2", 1), Outcome.APPLIED),
        (("n2", 2), Outcome.REJECTED),
        (("n2", 3), Outcome.PENDING),
        (("n2", 4), Outcome.PENDING),
        (("n2", 1), Outcome.DUPLICATE),
        (("n3", 2), Outcome.PENDING),
    ]
    assert plan.pending_counts() == {
        "gap": 1, "epoch": 2, "clock_skew": 0, "unsigned": 0, "fork": 0, "rejected_budget": 0
    }
    assert plan.result().applied == 1 and plan.vv == {"n2": 2}


def test_sig_takes_no_part_in_the_same_op() -> None:
    op = build([("n2", "valid", 0)])[0]
    signed = dataclasses.replace(op, sig=b"s" * 64)
    m = mirrors()
    t = triage([op, signed], m)
    assert t.duplicates == (signed,) and t.fresh["n2"][1] is op  # the first copy is kept
    m = Mirrors({"n2": 1}, {"n2": op_hash(op)}, {}, ZoneTable(FLEET))
    plan = plan_remote(triage([signed], m), m, {op.id: op}, {}, LIM)
    assert len(plan.duplicates) == 1 and not plan.steps
    moved = dataclasses.replace(op, seq=2)
    pend = Mirrors({}, {}, {"n2": {2: (moved, "gap")}}, ZoneTable(FLEET))
    assert triage([dataclasses.replace(moved, sig=b"x")], pend).duplicates
    # Differing from a pending (never verified) op is no fork yet: contested.
    assert triage([dataclasses.replace(moved, value=b"\x02")], pend).contested == {("n2", 2)}
    with pytest.raises(ForkError):
        plan_remote(triage([dataclasses.replace(op, value=b"\x02")], m), m, {op.id: op}, {}, LIM)


def test_broken_chain_and_out_of_range_ints_refuse_the_batch() -> None:
    op = build([("n2", "valid", 0)])[0]
    with pytest.raises(ChainError):
        plan_remote(triage([dataclasses.replace(op, prev=b"\x01" * 32)], mirrors()), mirrors(), {}, {}, LIM)
    for field in ("hlc", "seq", "epoch"):
        with pytest.raises(DecodeError, match="2\\*\\*63"):
            triage([dataclasses.replace(op, **{field: HLC_LIMIT})], mirrors())


def test_clock_skew_waits_with_its_reason() -> None:
    op = Op("n2", 1, (START_MS + 10_000) << 16, "shared/", 1, "shared/k", "lww", encode_value(1), GENESIS)
    plan = plan_remote(triage([op], mirrors()), mirrors(), {}, {}, LIM)
    assert plan.pending["n2"][1][1].startswith("clock skew")
    assert plan.pending_counts()["clock_skew"] == 1


def test_local_plan_mints_on_the_chain_and_seals_the_last_op() -> None:
    chain = OpChain("n1", signer=lambda op: b"sig:" + op_hash(op)[:4])
    stamps = iter([T0 + 1, T0 + 2, T0 + 3])

    def boom(_: Any) -> bytes:
        raise RuntimeError("bad payload function")

    writes = [
        WriteSpec("lww", "shared/a", "shared/", 1, encode_value(1)),
        WriteSpec("counter", "shared/c", "shared/", 1, boom),
        WriteSpec("lww", "shared/b", "shared/", 1, encode_value(2)),
    ]
    plan = plan_local(writes, chain, lambda: next(stamps), ZoneTable(FLEET), {("counter", "shared/c"): None})
    assert [op.seq for op in plan.ops] == [1, 2] and plan.taken == (0, 2)
    assert plan.failed[0][0] == 1 and isinstance(plan.failed[0][1], RuntimeError)
    assert plan.ops[0].sig is None and plan.ops[1].sig == b"sig:" + op_hash(plan.ops[1])[:4]
    assert plan.ops[1].prev == op_hash(plan.ops[0]) and chain.tip == (2, op_hash(plan.ops[1]))
    assert plan.start == (0, GENESIS)


def test_local_stamp_past_what_sqlite_stores_fails_the_write_alone() -> None:
    chain = OpChain("n1")
    plan = plan_local(
        [WriteSpec("lww", "shared/a", "shared/", 1, encode_value(1))],
        chain, lambda: HLC_LIMIT, ZoneTable(FLEET), {},
    )
    assert not plan.ops and isinstance(plan.failed[0][1], ClockError)
    assert chain.tip == (0, GENESIS)


# ---------------------------------------------------------------- forks without lock-out


def genuine_chain(n: int) -> list[Op]:
    chain = OpChain("n2")
    return [chain.mint(T0 + i, "shared/", 1, f"shared/k{i}", "lww", encode_value(i)) for i in range(n)]


def forged_at(ops: list[Op], seq: int) -> Op:
    """A different op at ``seq`` whose ``prev`` is bogus. (One whose ``prev`` is genuine
    extends the chain as well as the genuine op does: only signatures tell them apart.)"""
    return dataclasses.replace(ops[seq - 1], value=encode_value("forged"), prev=b"\x07" * 32)


def test_a_forged_pending_op_is_discarded_when_the_genuine_chain_reaches_it() -> None:
    ops = genuine_chain(5)
    r = Replay()
    r.apply([ops[0]])
    r.apply([forged_at(ops, 4)])  # held behind the gap at 2..3
    assert r.pending["n2"][4][0].value == encode_value("forged")
    m = Mirrors(r.vv, r.heads, r.pending, r.zones)
    plan = plan_remote(triage(ops[1:5], m), m, {}, {}, LIM)
    assert [op.seq for op in plan.applied] == [2, 3, 4, 5]
    assert plan.applied[2] == ops[3]
    assert plan.discarded == {"fork": 1}
    assert any("fork evidence" in w and "(n2, 4)" in w for w in plan.warnings)
    assert plan.pending == {}
    assert ("DELETE FROM pending WHERE origin = ? AND seq = ?", [("n2", 4)]) in plan.steps


def test_a_contested_op_that_still_waits_replaces_the_pending_one() -> None:
    ops = genuine_chain(5)
    r = Replay()
    r.apply([ops[0]])
    r.apply([forged_at(ops, 4)])
    m = Mirrors(r.vv, r.heads, r.pending, r.zones)
    plan = plan_remote(triage([ops[3], ops[4]], m), m, {}, {}, LIM)  # 2..3 still missing
    assert plan.pending["n2"][4][0] == ops[3]
    inserted = [rows for sql, rows in plan.steps if sql.startswith("INSERT OR REPLACE INTO pending")]
    assert [row[:2] for row in inserted[0]] == [("n2", 4), ("n2", 5)]
    r.apply([ops[3], ops[4]])
    r.apply(ops[1:3])
    assert r.vv["n2"] == 5 and r.pending == {}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(3, 8))
def test_no_forged_pending_op_locks_out_the_genuine_chain(data: st.DataObject, n: int) -> None:
    """Forged ops pending anywhere, the genuine chain in any batching: it all applies."""
    ops = genuine_chain(n)
    seqs = data.draw(st.sets(st.integers(2, n), min_size=1, max_size=3))
    r = Replay()
    for seq in sorted(seqs):
        r.apply([forged_at(ops, seq)])
    for batch in data.draw(batchings(n))[2]:
        r.apply([ops[i] for i in batch])
    # A forged op still pending when the walk reached it was dropped there, so the
    # genuine one it displaced is resent, as the next exchange would.
    missing = [op for op in ops if op.seq > r.vv.get("n2", 0)]
    if missing:
        r.apply(missing)
    assert r.vv["n2"] == n
    assert all(r.stored[op.id] == op for op in ops)
