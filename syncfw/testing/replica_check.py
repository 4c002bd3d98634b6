"""One acceptance suite for every :class:`~syncfw.log.Replica` implementation.

:func:`check_replica` holds a replica to the contract the sync protocol, the
mesh and the simulator rely on; ``MemoryReplica`` and the SQLite ``Node`` both
run it, so what one does the other does. What it asserts:

1. Acknowledged vectors only move forward: pointwise maximum per origin; a
   peer never acknowledged reads as the empty vector.
2. Applying a batch is idempotent: the second time every op is a duplicate
   and nothing changes.
3. "The same op" is :func:`~syncfw.log.same_op`, every field but ``sig``: a
   copy differing only in ``sig`` is a duplicate and the first copy is kept;
   one differing in any other field at a held, pending or in-batch
   ``(origin, seq)`` raises :class:`~syncfw.errors.ForkError`, and nothing of
   the batch is applied.
4. An op whose ``prev`` does not extend its origin's chain raises
   :class:`~syncfw.errors.ChainError`, and nothing of the batch is applied.
5. An op beyond a gap is held pending (counted in ``ApplyResult.pending``
   while held back) and applied when the gap fills.
6. Zone verdicts are the zone table's, op by op: a write in another node's
   zone is rejected and still counts in the version vector (and is relayed);
   an op naming an unknown epoch waits; an op naming a less specific zone than
   the owned sub-zone its key is in is rejected, alone or behind valid ops of
   its origin in one batch.
7. ``ops_since`` returns each origin's ops in seq order, contiguous from the
   vector given, within ``limit`` and (but for the op that crosses it)
   ``max_bytes``; calling again with the grown vector continues with no gap
   and no duplicate.
8. Concurrent lww writes converge by :func:`~syncfw.crdt.lww.lww_wins`
   (greater hlc, then greater origin; a tombstone wins like any write),
   whatever order they arrive in, and replicas that exchange ops agree.
9. A signed fleet (an authority key in the bootstrap) applies an origin's ops
   only up to the highest head its registered key signed; a head signed by
   another key covers nothing, and the genuine copy re-sent replaces it; only
   verified heads keep their ``sig``. Conflicting unsigned ops are discarded,
   never a ``ForkError``/``ChainError``; a signed conflicting op is fork
   evidence and holds its origin while other origins apply; ops past a
   revocation point are rejected and still counted; once the authority keeps
   the branch a replica holds, the origin goes on and the other branch is
   discarded.
10. Below a compaction point, a snapshot (:mod:`syncfw.sync.snapshot`):
   ``compact()`` drops what every acknowledging peer holds and
   ``ops_since`` then serves nothing below it; ``snapshot()`` (through its
   wire form) installed into a fresh replica gives the same state and
   vector, releases ops held behind its heads, and the origins' chains go
   on from its heads; ops at or below it are duplicates; installing it twice
   changes nothing; a snapshot whose head contradicts a held one raises
   :class:`~syncfw.errors.ForkError` and changes nothing. A state larger
   than ``snapshot(max_bytes=...)`` raises
   :class:`~syncfw.errors.SnapshotTooLargeError`, naming the cap.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from syncfw.crdt.lww import TOMBSTONE, LwwState, lww_wins
from syncfw.errors import ChainError, ForkError, SnapshotTooLargeError
from syncfw.keyfiles import NodeKeys
from syncfw.log import (
    ApplyResult,
    Op,
    OpChain,
    Replica,
    VersionVector,
    decode_value,
    encode_value,
    op_hash,
)
from syncfw.sync.snapshot import decode_snapshot, encode_snapshot
from syncfw.testing.ops import OpWriter
from syncfw.testing.trust import SignedFleet
from syncfw.trust import (
    KEEP_KIND,
    KEYREG_KIND,
    REVOKE_KIND,
    ForkResolution,
    seal_statement,
)
from syncfw.zones import Fleet, Grant

__all__ = ["CHECK_FLEET", "REPLICA_CHECKS", "CheckedReplica", "ReplicaFactory", "check_replica"]

CHECK_FLEET = Fleet(
    fleet_id="replica-check",
    authority="cloud",
    grants=(Grant.of("shared/", "*"), Grant.of("shared/locked/", "n1")),
)
"""The fleet every check gives the factory: ``shared/`` is everyone's, its
sub-zone ``shared/locked/`` only ``n1``'s (both bootstrap grants at epoch 1)."""


class CheckedReplica(Replica, Protocol):
    """A replica the suite can read back: :class:`Replica` plus ``get``."""

    def get(self, key: str) -> Any:
        """The current lww value of ``key`` (None when absent or deleted), or an awaitable of it."""
        ...


class ReplicaFactory(Protocol):
    """``factory(node_id, fleet)``: an async context manager yielding a fresh, empty
    replica with that id in that fleet. Several may be open at once.

    The signed-fleet checks call ``factory(node_id, fleet, keys=keys)`` with a fleet
    that has an authority key and the node's :class:`~syncfw.keyfiles.NodeKeys`.
    """

    def __call__(
        self, node_id: str, fleet: Fleet, /, *, keys: NodeKeys | None = None
    ) -> AbstractAsyncContextManager[CheckedReplica]: ...


Check = Callable[[ReplicaFactory], Awaitable[None]]


async def check_replica(factory: ReplicaFactory, *, only: Iterable[str] | None = None) -> None:
    """Run the replica contract (see the module docstring) against ``factory``'s replicas.

    Args:
        factory: makes fresh replicas (see :data:`ReplicaFactory`).
        only: names of checks (keys of :data:`REPLICA_CHECKS`) to run; all when None.

    Raises:
        AssertionError: a check failed, or a replica raised where the contract
            allows no error; the message names the check and what differed.
        KeyError: ``only`` names no such check.
    """
    names = list(REPLICA_CHECKS) if only is None else list(only)
    for name in names:
        check = REPLICA_CHECKS[name]
        try:
            await check(factory)
        except AssertionError as exc:
            raise AssertionError(f"check_replica[{name}]: {exc}") from exc
        except Exception as exc:  # an error the contract does not allow is a failed check
            raise AssertionError(f"check_replica[{name}]: unexpected {exc!r}") from exc


# -- helpers ------------------------------------------------------------------------------


async def _get(replica: CheckedReplica, key: str) -> Any:
    res = replica.get(key)
    return await res if inspect.isawaitable(res) else res


async def _snapshot(replica: CheckedReplica, keys: Iterable[str]) -> tuple[Any, ...]:
    """What must not change when a batch is refused or repeated."""
    vv = await replica.version_vector()
    ops = [op.to_tuple() for op in await replica.ops_since({})]
    return (vv, ops, {k: await _get(replica, k) for k in keys})


async def _expect_refused(
    replica: CheckedReplica, batch: list[Op], error: type[Exception], what: str, keys: list[str]
) -> None:
    before = await _snapshot(replica, keys)
    try:
        got = await replica.apply_remote(batch)
    except error:
        pass
    else:
        raise AssertionError(f"{what}: expected {error.__name__}, got {got}")
    after = await _snapshot(replica, keys)
    assert after == before, f"{what}: the refused batch changed the replica: {before} -> {after}"


# -- the checks ---------------------------------------------------------------------------


async def _acks_move_forward(factory: ReplicaFactory) -> None:
    async with factory("r1", CHECK_FLEET) as r:
        assert await r.peer_ack("p1") == {}, "a peer never acknowledged must read as {}"
        await r.acknowledge("p1", {"n1": 5, "n2": 1})
        await r.acknowledge("p1", {"n1": 2, "n3": 4})
        got = await r.peer_ack("p1")
        want = {"n1": 5, "n2": 1, "n3": 4}
        assert got == want, (
            f"acks must only move forward (pointwise max per origin): after acking "
            f"{{n1: 5, n2: 1}} then {{n1: 2, n3: 4}}, peer_ack is {got}, expected {want}"
        )
        await r.acknowledge("p2", {"n1": 1})
        assert await r.peer_ack("p1") == want, "an ack by one peer changed another's"
        assert await r.peer_ack("p2") == {"n1": 1}
        assert await r.peer_ack("p3") == {}, "an unknown peer's ack must read as {}"


async def _idempotence(factory: ReplicaFactory) -> None:
    a, b = OpWriter("n1", "shared/", epoch=1), OpWriter("n2")
    batch = [a.write("x", 1), b.write("y", 2), a.write("x", 3), b.write("z", 4)]
    keys = ["shared/x", "fleet/n2/y", "fleet/n2/z"]
    async with factory("r1", CHECK_FLEET) as r:
        first = await r.apply_remote(batch)
        assert (first.applied, first.duplicates) == (4, 0), f"first apply: {first}"
        before = await _snapshot(r, keys)
        second = await r.apply_remote(batch)
        want = ApplyResult(duplicates=4)
        assert second == want, f"applying a batch twice: second result {second}, expected {want}"
        after = await _snapshot(r, keys)
        assert after == before, f"a repeated batch changed the replica: {before} -> {after}"
        assert await _get(r, "shared/x") == 3, "the later write of shared/x must win"
        assert await _get(r, "fleet/n2/z") == 4


async def _same_op_ignores_sig(factory: ReplicaFactory) -> None:
    w = OpWriter("n2")
    ops = [w.write(f"k{i}", i) for i in range(4)]

    def signed(op: Op, sig: bytes | None) -> Op:
        return dataclasses.replace(op, sig=sig)

    async with factory("r1", CHECK_FLEET) as r:
        await r.apply_remote([ops[0], signed(ops[1], b"first")])
        # held ops, re-sent with another sig (or none)
        got = await r.apply_remote([signed(ops[0], b"other"), signed(ops[1], None)])
        assert got == ApplyResult(duplicates=2), (
            f"an op differing only in sig must be a duplicate, got {got}"
        )
        # a pending op (behind a gap), re-sent with another sig
        await r.apply_remote([signed(ops[3], b"first")])
        got = await r.apply_remote([signed(ops[3], b"other")])
        assert (got.applied, got.duplicates) == (0, 1), (
            f"a pending op re-sent with another sig must be a duplicate, got {got}"
        )
        # in one batch, twice with different sigs
        got = await r.apply_remote([signed(ops[2], b"first"), signed(ops[2], b"other")])
        assert (got.applied, got.duplicates) == (2, 1), (
            f"an op twice in a batch, differing only in sig: expected 2 applied (it and the "
            f"pending one after it) and 1 duplicate, got {got}"
        )
        held = {op.seq: op.sig for op in await r.ops_since({}) if op.origin == "n2"}
        want = {1: None, 2: b"first", 3: b"first", 4: b"first"}
        assert held == want, (
            f"the first copy of each op must be kept: sigs held {held}, expected {want}"
        )


_FORK_FIELDS: dict[str, Any] = {
    "hlc": 999,
    "zone": "fleet/n9/",
    "epoch": 7,
    "key": "fleet/n2/other",
    "kind": "counter",
    "value": b"\xa5other",
    "prev": b"\x07" * 32,
}


async def _fork_applies_nothing(factory: ReplicaFactory) -> None:
    w, bystander = OpWriter("n2"), OpWriter("n3")
    ops = [w.write(f"k{i}", i) for i in range(4)]
    innocent = bystander.write("k", "innocent")
    keys = ["fleet/n3/k", "fleet/n2/k0", "fleet/n2/k1"]
    async with factory("r1", CHECK_FLEET) as r:
        await r.apply_remote(ops[:2])
        for name, value in _FORK_FIELDS.items():
            forked = dataclasses.replace(ops[1], **{name: value})
            await _expect_refused(
                r,
                [innocent, forked],
                ForkError,
                f"an op differing in {name} from the held one at {ops[1].id}",
                keys,
            )
            forked = dataclasses.replace(ops[2], **{name: value})
            await _expect_refused(
                r,
                [innocent, ops[2], forked],
                ForkError,
                f"two ops at {ops[2].id} in one batch, differing in {name}",
                keys,
            )
        assert await r.version_vector() == {"n2": 2}, "refused batches must apply nothing"


async def _pending_fork_never_locks_out(factory: ReplicaFactory) -> None:
    # A forged op held pending (behind a gap) was never chain-verified: a batch
    # carrying the genuine op at its seq is not refused for it, and the
    # genuine chain applies (the forged copy is discarded as fork evidence).
    w = OpWriter("n2")
    ops = [w.write(f"k{i}", i) for i in range(5)]
    forged = dataclasses.replace(ops[3], value=encode_value("forged"), prev=b"\x07" * 32)
    async with factory("r1", CHECK_FLEET) as r:
        await r.apply_remote(ops[:2])
        got = await r.apply_remote([forged])
        assert got.pending >= 1, f"an op behind a gap is held pending: {got}"
        try:
            got = await r.apply_remote(ops[1:])
        except ForkError as exc:
            raise AssertionError(
                f"a forged op held pending locked out the genuine chain: {exc}"
            ) from None
        vv = await r.version_vector()
        assert vv == {"n2": 5}, f"the genuine chain must apply past the forged pending op: {vv}"
        assert await _get(r, "fleet/n2/k3") == 3, "the genuine op at seq 4 must win"


async def _forged_prev_applies_nothing(factory: ReplicaFactory) -> None:
    w, bystander = OpWriter("n2"), OpWriter("n3")
    ops = [w.write(f"k{i}", i) for i in range(3)]
    innocent = bystander.write("k", "innocent")
    keys = ["fleet/n3/k", "fleet/n2/k2"]
    forged_first = dataclasses.replace(OpWriter("n4").write("k", 1), prev=b"\x01" * 32)
    async with factory("r1", CHECK_FLEET) as r:
        await r.apply_remote(ops[:2])
        forged = dataclasses.replace(ops[2], prev=b"\x01" * 32)
        await _expect_refused(
            r, [innocent, forged], ChainError, "an op whose prev is not its origin's head", keys
        )
        await _expect_refused(
            r, [innocent, forged_first], ChainError, "a seq-1 op whose prev is not GENESIS", keys
        )
        got = await r.apply_remote([innocent, ops[2]])
        assert got.applied == 2, f"the genuine op must still apply after a forged one: {got}"


async def _gap_held_pending(factory: ReplicaFactory) -> None:
    w = OpWriter("n2")
    ops = [w.write(f"k{i}", i) for i in range(4)]
    async with factory("r1", CHECK_FLEET) as r:
        got = await r.apply_remote(ops[2:])
        assert (got.applied, got.pending) == (0, 2), f"ops 3, 4 before 1, 2: {got}"
        vv = await r.version_vector()
        assert vv.get("n2", 0) == 0, f"ops beyond a gap must not count in the vector: {vv}"
        assert await _get(r, "fleet/n2/k2") is None, "an op beyond a gap was merged"
        got = await r.apply_remote(ops[:1])
        assert (got.applied, got.pending) == (1, 2), f"op 1 (3, 4 still held back): {got}"
        got = await r.apply_remote(ops[1:2])
        assert (got.applied, got.pending) == (3, 0), (
            f"op 2 fills the gap: it and the held-back 3, 4 must apply: {got}"
        )
        assert await r.version_vector() == {"n2": 4}
        values = [await _get(r, f"fleet/n2/k{i}") for i in range(4)]
        assert values == [0, 1, 2, 3], f"values after the gap filled: {values}"


async def _foreign_write_rejected(factory: ReplicaFactory) -> None:
    w = OpWriter("n2")
    foreign = w.write("x", "not yours", zone="fleet/n1/")
    own = w.write("y", "mine")
    async with factory("r1", CHECK_FLEET) as r1, factory("r2", CHECK_FLEET) as r2:
        got = await r1.apply_remote([foreign, own])
        assert (got.applied, got.rejected) == (1, 1), (
            f"n2 writing in n1's zone fleet/n1/ must be rejected, its next op applied: {got}"
        )
        assert await _get(r1, "fleet/n1/x") is None, "a rejected op was merged"
        assert await _get(r1, "fleet/n2/y") == "mine"
        vv = await r1.version_vector()
        assert vv.get("n2") == 2, f"a rejected op still counts in the version vector: {vv}"
        relayed = await r1.ops_since({})
        assert [op.seq for op in relayed if op.origin == "n2"] == [1, 2], (
            "a rejected op must still be relayed, or peers never get past it"
        )
        got = await r2.apply_remote(relayed)
        assert (got.applied, got.rejected) == (1, 1), f"the relayed ops on a second replica: {got}"
        assert await r2.version_vector() == vv


async def _unknown_epoch_waits(factory: ReplicaFactory) -> None:
    w = OpWriter("n2", "shared/", epoch=1)
    ops = [w.write("a", 1), w.write("b", 2, epoch=2), w.write("c", 3)]
    async with factory("r1", CHECK_FLEET) as r:
        got = await r.apply_remote(ops)
        assert (got.applied, got.rejected, got.pending) == (1, 0, 2), (
            f"an op naming epoch 2 of shared/ (unknown) must wait, and the op after it: {got}"
        )
        vv = await r.version_vector()
        assert vv.get("n2") == 1, f"a waiting op must not count in the vector yet: {vv}"
        assert await _get(r, "shared/b") is None, "an op naming an unknown epoch was merged"
        assert await _get(r, "shared/c") is None, "an op behind a waiting one was merged"


async def _sub_zone(factory: ReplicaFactory, *, behind: int) -> None:
    w = OpWriter("n2", "shared/", epoch=1)
    valid = [w.write(f"k{i}", i) for i in range(behind)]
    crafted = w.write("locked/k0", "crafted")  # key in shared/locked/, naming shared/
    owner = OpWriter("n1", "shared/locked/", epoch=1).write("k1", "owner's")
    how = f"behind {behind} valid shared/ ops in one batch" if behind else "alone"
    async with factory("r1", CHECK_FLEET) as r:
        got = await r.apply_remote([*valid, crafted, owner])
        assert (got.applied, got.rejected) == (behind + 1, 1), (
            f"n2's op for shared/locked/k0 naming zone shared/ must be rejected ({how}); "
            f"n1's own op in shared/locked/ applied: {got}"
        )
        assert await _get(r, "shared/locked/k0") is None, (
            f"a write around the owned sub-zone shared/locked/ was merged ({how})"
        )
        assert await _get(r, "shared/locked/k1") == "owner's"
        vv = await r.version_vector()
        assert vv.get("n2") == behind + 1, f"the rejected op still counts: {vv}"


async def _sub_zone_alone(factory: ReplicaFactory) -> None:
    await _sub_zone(factory, behind=0)


async def _sub_zone_in_batch(factory: ReplicaFactory) -> None:
    await _sub_zone(factory, behind=3)


def _check_page(page: list[Op], vv: Mapping[str, int], limit: int, what: str) -> None:
    assert len(page) <= limit, f"{what}: {len(page)} ops, over limit={limit}"
    nxt = dict(vv)
    for op in page:
        want = nxt.get(op.origin, 0) + 1
        assert op.seq == want, (
            f"{what}: ({op.origin}, {op.seq}) where ({op.origin}, {want}) was due: each "
            "origin's ops in seq order, contiguous from the vector given"
        )
        nxt[op.origin] = op.seq


async def _drain(r: CheckedReplica, *, limit: int, max_bytes: int | None, what: str) -> list[Op]:
    vv: VersionVector = {}
    out: list[Op] = []
    for _ in range(200):
        page = await r.ops_since(vv, limit=limit, max_bytes=max_bytes)
        if not page:
            return out
        _check_page(page, vv, limit, what)
        if max_bytes is not None:
            head = sum(len(op.value) for op in page[:-1])
            assert head <= max_bytes, (
                f"{what}: {head} value bytes before the last op, over max_bytes={max_bytes}"
            )
        for op in page:
            vv[op.origin] = op.seq
        out += page
    raise AssertionError(f"{what}: ops_since never ran dry")


async def _ops_since_order(factory: ReplicaFactory) -> None:
    writers = [OpWriter(o) for o in ("n2", "n3", "n4")]
    by_origin = {
        w.origin: [w.write(f"k{i}", "v" * (40 + 9 * i)) for i in range(10)] for w in writers
    }
    interleaved = [ops[i] for i in range(10) for ops in by_origin.values()]
    every = sorted(op.to_tuple() for op in interleaved)
    async with factory("r1", CHECK_FLEET) as r:
        await r.apply_remote(interleaved)
        full = await r.ops_since({})
        _check_page(full, {}, 10_000, "ops_since({})")
        assert sorted(op.to_tuple() for op in full) == every, "ops_since({}) must return every op"
        start = {"n2": 4, "n3": 10}
        tail = await r.ops_since(start)
        _check_page(tail, start, 10_000, f"ops_since({start})")
        want = {("n2", s) for s in range(5, 11)} | {("n4", s) for s in range(1, 11)}
        assert {op.id for op in tail} == want, f"ops_since({start}) must start after the vector"
        for limit, max_bytes in ((7, None), (10_000, 250), (4, 120)):
            what = f"paging with limit={limit}, max_bytes={max_bytes}"
            got = await _drain(r, limit=limit, max_bytes=max_bytes, what=what)
            assert sorted(op.to_tuple() for op in got) == every, (
                f"{what}: the pages together must hold every op once (no gap, no duplicate)"
            )
        small = await r.ops_since({}, max_bytes=250)
        assert 1 <= len(small) < len(every), (
            f"max_bytes=250 must bound the answer (and still make progress): {len(small)} ops"
        )


def _lww_batches() -> dict[str, list[Op]]:
    n1, n2, n3 = (OpWriter(o, "shared/", epoch=1) for o in ("n1", "n2", "n3"))
    return {
        "n1": [
            n1.write("y", "n1-y", hlc=60),
            n1.write("x", "n1-x", hlc=100),
            n1.delete("z", hlc=110),
        ],
        "n2": [
            n2.write("y", "n2-y", hlc=50),
            n2.write("x", "n2-x", hlc=100),
            n2.write("z", "n2-z", hlc=105),
            n2.write("w", "n2-w", hlc=120),
        ],
        "n3": [n3.delete("w", hlc=115)],
    }


_LWW_WANT = {"shared/x": "n2-x", "shared/y": "n1-y", "shared/z": None, "shared/w": "n2-w"}
"""x: equal hlc, the greater origin wins; y: the greater hlc wins over the greater
origin; z: a later delete wins; w: a write after a delete wins."""


async def _lww_convergence(factory: ReplicaFactory) -> None:
    batches = _lww_batches()
    state: dict[str, LwwState] = {}
    for op in (op for ops in batches.values() for op in ops):
        cand = (op.hlc, op.origin, op.value)
        if lww_wins(cand, state.get(op.key)):
            state[op.key] = cand
    folded = {
        k: None if s is None or s[2] == TOMBSTONE else decode_value(s[2]) for k, s in state.items()
    }
    assert folded == _LWW_WANT, f"lww_wins itself disagrees with the contract: {folded}"
    async with factory("r1", CHECK_FLEET) as r1, factory("r2", CHECK_FLEET) as r2:
        for origin in ("n1", "n2", "n3"):
            await r1.apply_remote(batches[origin])
        for origin in ("n3", "n2", "n1"):
            await r2.apply_remote(batches[origin])
        for r, order in ((r1, "n1, n2, n3"), (r2, "n3, n2, n1")):
            got = {k: await _get(r, k) for k in _LWW_WANT}
            assert got == _LWW_WANT, (
                f"concurrent lww writes applied in origin order {order}: {got}, "
                f"expected {_LWW_WANT} (lww_wins: greater hlc, then greater origin)"
            )


async def _replicas_converge_by_exchange(factory: ReplicaFactory) -> None:
    batches = _lww_batches()
    async with factory("r1", CHECK_FLEET) as r1, factory("r2", CHECK_FLEET) as r2:
        await r1.apply_remote(batches["n1"] + batches["n3"])
        await r2.apply_remote(batches["n2"])
        for src, dst in ((r1, r2), (r2, r1)):
            while ops := await src.ops_since(await dst.version_vector(), limit=2):
                got = await dst.apply_remote(ops)
                assert got.applied + got.rejected + got.pending > 0, (
                    f"an exchange made no progress: {got} for {[op.id for op in ops]}"
                )
        vv1, vv2 = await r1.version_vector(), await r2.version_vector()
        assert vv1 == vv2 == {"n1": 3, "n2": 4, "n3": 1}, f"vectors after an exchange: {vv1}, {vv2}"
        for r in (r1, r2):
            values = {k: await _get(r, k) for k in _LWW_WANT}
            assert values == _LWW_WANT, (
                f"{r.node_id} after an exchange: {values}, expected {_LWW_WANT}"
            )


# -- signed fleets ---------------------------------------------------------------------


def _signed_chain(sf: SignedFleet, origin: str, n: int, heads: set[int]) -> list[Op]:
    """``origin``'s registration op, then ``n - 1`` lww ops; ``heads`` sealed with its key."""
    chain = OpChain(origin)
    signer = sf.signer(origin)
    zone = f"fleet/{origin}/"
    out = [chain.mint(1, zone, 0, zone + "keys/0", KEYREG_KIND, sf.keys(origin).registration)]
    for i in range(2, n + 1):
        out.append(chain.mint(i, zone, 0, f"{zone}k{i}", "lww", encode_value(i)))
    return [dataclasses.replace(op, sig=signer(op)) if op.seq in heads else op for op in out]


async def _signed_heads_gate(factory: ReplicaFactory) -> None:
    sf = SignedFleet(CHECK_FLEET)
    ops = _signed_chain(sf, "n2", 5, {3, 5})
    async with factory("r1", sf.fleet, keys=sf.keys("r1")) as r:
        got = await r.apply_remote(ops[:2])
        assert (got.applied, got.pending) == (0, 2), (
            f"ops no verified head covers must wait, got {got}"
        )
        got = await r.apply_remote(ops[2:3])
        assert got.applied == 3, f"a verified head covers every op below it, got {got}"
        wrong = dataclasses.replace(ops[4], sig=sf.signer("r1")(ops[4]))
        got = await r.apply_remote([ops[3], wrong])
        assert (got.applied, got.pending) == (0, 2), (
            f"a head signed by another node's key must cover nothing, got {got}"
        )
        got = await r.apply_remote([ops[4]])
        assert got.applied == 2, (
            f"the genuine head, re-sent, must replace a wrongly signed held copy, got {got}"
        )
        sigs = {op.seq: op.sig is not None for op in await r.ops_since({}) if op.origin == "n2"}
        assert sigs == {1: False, 2: False, 3: True, 4: False, 5: True}, (
            f"only verified heads keep their sig (relayed onward), got {sigs}"
        )


async def _signed_conflicts_never_refuse(factory: ReplicaFactory) -> None:
    sf = SignedFleet(CHECK_FLEET)
    ops = _signed_chain(sf, "n2", 6, {3, 6})
    async with factory("r1", sf.fleet, keys=sf.keys("r1")) as r:
        await r.apply_remote(ops[:3])
        keys = ["fleet/n2/k2", "fleet/n2/k3"]
        before = await _snapshot(r, keys)
        unsigned_fork = dataclasses.replace(ops[1], value=encode_value("forged"), sig=None)
        stray = dataclasses.replace(ops[3], prev=b"\x01" * 32, sig=None)
        got = await r.apply_remote([unsigned_fork, stray])  # no ForkError, no ChainError
        assert got.applied == 0, f"conflicting unsigned ops must be discarded, got {got}"
        after = await _snapshot(r, keys)
        assert after == before, f"discarded ops changed the replica: {before} -> {after}"
        got = await r.apply_remote(ops[3:])
        assert got.applied == 3, f"the genuine chain must go on after them, got {got}"


def _forked_n2(sf: SignedFleet) -> tuple[list[Op], Op, Op]:
    """n2's signed ops 1-3, a signed twin of op 3 (another history), and op 4 after the
    first branch."""
    ops = _signed_chain(sf, "n2", 3, {3})
    other = OpChain("n2", 2, op_hash(ops[1]))
    twin = other.mint(3, "fleet/n2/", 0, "fleet/n2/k3", "lww", encode_value("twin"))
    twin = dataclasses.replace(twin, sig=sf.signer("n2")(twin))
    later = _signed_chain(sf, "n2", 4, {4})[3]
    later = dataclasses.replace(later, prev=op_hash(ops[2]))
    later = dataclasses.replace(later, sig=sf.signer("n2")(later))
    return ops, twin, later


async def _signed_fork_holds_origin(factory: ReplicaFactory) -> None:
    sf = SignedFleet(CHECK_FLEET)
    ops, twin, later = _forked_n2(sf)
    n3 = _signed_chain(sf, "n3", 2, {2})
    async with factory("r1", sf.fleet, keys=sf.keys("r1")) as r:
        await r.apply_remote(ops)
        got = await r.apply_remote([twin, *n3])  # two signed ops at (n2, 3): evidence
        assert got.applied == 2, f"other origins in the batch must still apply, got {got}"
        assert await _get(r, "fleet/n2/k3") == 3, "the held op must stay"
        got = await r.apply_remote([later])
        assert (got.applied, got.pending) == (0, 1), (
            f"an origin with fork evidence is held until the authority acts, got {got}"
        )


async def _fork_resolution_keeps_a_branch(factory: ReplicaFactory) -> None:
    sf = SignedFleet(CHECK_FLEET)
    ops, twin, later = _forked_n2(sf)
    ruling = ForkResolution(sf.fleet.fleet_id, "n2", op_hash(ops[2]), 3)
    auth = OpChain("cloud")
    keep = auth.mint(
        1, "sys/", 0, "sys/trust/k", KEEP_KIND, seal_statement(sf.authority_key, ruling)
    )
    keep = dataclasses.replace(keep, sig=sf.signer("cloud")(keep))
    async with factory("r1", sf.fleet, keys=sf.keys("r1")) as r:
        await r.apply_remote(ops)
        await r.apply_remote([twin])  # evidence: n2 is held
        got = await r.apply_remote([keep, later])
        assert got.applied == 2, (
            f"once the authority keeps the branch this replica holds, n2 goes on, got {got}"
        )
        got = await r.apply_remote([twin])
        assert got.applied == 0, f"the dropped branch is discarded, got {got}"
        assert await _get(r, "fleet/n2/k4") == 4


async def _revoked_key_rejected(factory: ReplicaFactory) -> None:
    sf = SignedFleet(CHECK_FLEET)
    ops = _signed_chain(sf, "n2", 4, {2, 4})
    auth = OpChain("cloud")
    rev = auth.mint(1, "sys/", 0, "sys/trust/r", REVOKE_KIND, sf.revoke("n2", 2))
    rev = dataclasses.replace(rev, sig=sf.signer("cloud")(rev))
    async with factory("r1", sf.fleet, keys=sf.keys("r1")) as r:
        got = await r.apply_remote([rev, *ops])
        assert (got.applied, got.rejected) == (3, 2), (
            f"ops past a revocation point are rejected (and still counted), got {got}"
        )
        vv = await r.version_vector()
        assert vv.get("n2") == 4, f"rejected ops stay in their origin's chain, vv {vv}"
        assert await _get(r, "fleet/n2/k2") == 2, "ops before the revocation point apply"
        assert await _get(r, "fleet/n2/k3") is None, "ops past it never merge"


async def _snapshot_below_compaction(factory: ReplicaFactory) -> None:
    a, b = OpWriter("n1", "shared/", epoch=1), OpWriter("n2")
    first = [a.write("x", 1), b.write("y", 2), a.write("x", 3), b.write("z", 4)]
    later = [a.write("x", 5), b.write("w", 6)]
    keys = ["shared/x", "fleet/n2/y", "fleet/n2/z", "fleet/n2/w"]
    async with (
        factory("r1", CHECK_FLEET) as src,
        factory("r2", CHECK_FLEET) as fresh,
        factory("r3", CHECK_FLEET) as other,
    ):
        await src.apply_remote(first)
        await src.acknowledge("p1", await src.version_vector())
        removed = await src.compact()  # type: ignore[attr-defined]
        assert removed == 4, f"compacting 4 ops every peer holds removed {removed}"
        floor = src.compacted()  # type: ignore[attr-defined]
        assert floor == {"n1": 2, "n2": 2}, f"compaction points {floor}"
        assert await src.ops_since({}) == [], "ops below a compaction point were served"
        snap = decode_snapshot(encode_snapshot(await src.snapshot()))  # type: ignore[attr-defined]
        assert dict(snap.vv) == {"n1": 2, "n2": 2}, f"the snapshot stands for {snap.vv}"
        await fresh.apply_remote([later[1]])  # held behind the gap the snapshot fills
        await fresh.install_snapshot(snap, source="r1")  # type: ignore[attr-defined]
        got = await fresh.version_vector()
        assert got == {"n1": 2, "n2": 3}, f"after the snapshot the vector is {got}"
        want = {"shared/x": 3, "fleet/n2/y": 2, "fleet/n2/z": 4, "fleet/n2/w": 6}
        values = {k: await _get(fresh, k) for k in keys}
        assert values == want, f"state after the snapshot {values}, expected {want}"
        before = await _snapshot(fresh, keys)
        await fresh.install_snapshot(snap, source="r1")  # type: ignore[attr-defined]
        assert await _snapshot(fresh, keys) == before, "installing a snapshot twice changed it"
        res = await fresh.apply_remote([*first, later[0]])
        assert (res.applied, res.duplicates) == (1, 4), (
            f"ops at or below the snapshot must be duplicates and the chain go on from its "
            f"heads: {res}"
        )
        assert await _get(fresh, "shared/x") == 5
        forked = OpWriter("n1", "shared/", epoch=1)
        await other.apply_remote([forked.write("x", 7), forked.write("x", 8)])
        keep = await _snapshot(other, keys)
        try:
            await other.install_snapshot(snap, source="r1")  # type: ignore[attr-defined]
        except ForkError:
            pass
        else:
            raise AssertionError("a snapshot contradicting a held head was installed")
        assert await _snapshot(other, keys) == keep, "a refused snapshot changed the replica"


async def _snapshot_bounded(factory: ReplicaFactory) -> None:
    w = OpWriter("n2")
    async with factory("r1", CHECK_FLEET) as src:
        await src.apply_remote([w.write(f"k{i}", "v" * 200) for i in range(20)])
        await src.acknowledge("p1", await src.version_vector())
        await src.compact()  # type: ignore[attr-defined]
        refusal = ""
        try:
            await src.snapshot(max_bytes=1024)  # type: ignore[attr-defined]
        except SnapshotTooLargeError as exc:
            refusal = str(exc)
        assert refusal, "a snapshot of about 4 KB was built under a 1 KB cap"
        assert "1024" in refusal, f"the refusal does not name the cap: {refusal}"
        snap = await src.snapshot(max_bytes=1 << 20)  # type: ignore[attr-defined]
        assert len(snap.states) == 20, f"under a cap it holds, the snapshot has {len(snap.states)}"


REPLICA_CHECKS: dict[str, Check] = {
    "acks_move_forward": _acks_move_forward,
    "idempotence": _idempotence,
    "same_op_ignores_sig": _same_op_ignores_sig,
    "fork_applies_nothing": _fork_applies_nothing,
    "pending_fork_never_locks_out": _pending_fork_never_locks_out,
    "forged_prev_applies_nothing": _forged_prev_applies_nothing,
    "gap_held_pending": _gap_held_pending,
    "foreign_write_rejected": _foreign_write_rejected,
    "unknown_epoch_waits": _unknown_epoch_waits,
    "sub_zone_alone": _sub_zone_alone,
    "sub_zone_in_batch": _sub_zone_in_batch,
    "ops_since_order": _ops_since_order,
    "lww_convergence": _lww_convergence,
    "replicas_converge_by_exchange": _replicas_converge_by_exchange,
    "signed_heads_gate": _signed_heads_gate,
    "signed_conflicts_never_refuse": _signed_conflicts_never_refuse,
    "signed_fork_holds_origin": _signed_fork_holds_origin,
    "revoked_key_rejected": _revoked_key_rejected,
    "fork_resolution_keeps_a_branch": _fork_resolution_keeps_a_branch,
    "snapshot_below_compaction": _snapshot_below_compaction,
    "snapshot_bounded": _snapshot_bounded,
}
"""Every check of the contract, by name (``check_replica(factory, only=[name])``)."""
