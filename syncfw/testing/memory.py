"""An in-memory :class:`~syncfw.log.Replica`: a dict of op chains and an LWW map.

Invariants (the same the SQLite store keeps, so the simulator's verdicts carry):

1. Each origin's held ops are a contiguous chain from seq 1; ``prev`` of each is
   the :func:`~syncfw.log.op_hash` of the one before (``GENESIS`` for seq 1).
2. :meth:`apply_remote` is atomic: every op is checked (fork, chain) before
   anything changes; on :class:`ChainError`/:class:`ForkError` nothing is applied.
3. An op beyond a gap, or naming a zone epoch not known yet, is held pending and
   applied when its predecessor arrives; a zone violation is recorded as
   rejected (it still counts in the version vector) and never merged.
4. State is a deterministic fold: last writer wins by ``(hlc, origin)``, so the
   same set of ops gives the same state in any order.
5. No method ever suspends, so sessions can be driven without an event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from syncfw.clock import HLC
from syncfw.errors import ChainError, ForkError
from syncfw.log import GENESIS, ApplyResult, Op, VersionVector, decode_value, encode_value, op_hash
from syncfw.zones import Fleet, Verdict, ZoneTable

__all__ = ["MemoryReplica"]


class MemoryReplica:
    """A whole replica in a few dicts.

    Args:
        node_id: this replica's id.
        fleet: the fleet it belongs to (zones, fleet id).
        wall: wall clock in ms for the HLC (the simulator injects virtual, drifting time).
    """

    def __init__(
        self, node_id: str, fleet: Fleet | None = None, *, wall: Callable[[], int] | None = None
    ) -> None:
        self._node_id = node_id
        self.fleet = fleet or Fleet()
        self.zones = ZoneTable(self.fleet)
        self.clock = HLC(wall) if wall is not None else HLC(lambda: 0)
        self.chains: dict[str, list[Op]] = {}
        self.hashes: dict[str, list[bytes]] = {}
        self.pending: dict[str, dict[int, Op]] = {}
        self.rejected: dict[tuple[str, int], str] = {}
        self.state: dict[str, tuple[int, str, bytes]] = {}
        self.acks: dict[str, VersionVector] = {}
        self.applied_ids: set[tuple[str, int]] = set()
        self.apply_count: dict[tuple[str, int], int] = {}
        self.listeners: list[Callable[[list[Op]], None]] = []

    # -- Replica ------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        """This replica's node id."""
        return self._node_id

    @property
    def fleet_id(self) -> str:
        """The fleet's id."""
        return self.fleet.fleet_id

    def hlc_now(self) -> int:
        """A fresh hybrid timestamp."""
        return self.clock.now()

    async def version_vector(self) -> VersionVector:
        """Highest contiguous seq held per origin."""
        return self.vv()

    def vv(self) -> VersionVector:
        """:meth:`version_vector`, without awaiting."""
        return {o: len(c) for o, c in self.chains.items() if c}

    async def ops_since(
        self, vv: Mapping[str, int], *, limit: int = 10_000, max_bytes: int | None = None
    ) -> list[Op]:
        """Ops beyond ``vv``, each origin's in seq order, within ``limit``/``max_bytes``."""
        out: list[Op] = []
        size = 0
        for origin in sorted(self.chains):
            chain = self.chains[origin]
            for op in chain[vv.get(origin, 0) :]:
                if len(out) >= limit:
                    return out
                size += len(op.value) + len(op.key) + 80
                if max_bytes is not None and out and size > max_bytes:
                    return out
                out.append(op)
        return out

    async def apply_remote(self, ops: list[Op]) -> ApplyResult:
        """Merge a batch atomically (see the module invariants)."""
        # check first: forks against held and in-batch ops, chains at the frontier
        staged: dict[tuple[str, int], Op] = {}
        heads: dict[str, tuple[int, bytes]] = {}
        for op in ops:
            held = self._held(op.origin, op.seq) or staged.get(op.id) or self._pending_op(op)
            if held is not None:
                if held != op:
                    raise ForkError(f"two different ops at ({op.origin!r}, {op.seq})")
                continue
            staged[op.id] = op
            n, head = heads.get(op.origin) or self._head(op.origin)
            if op.seq == n + 1:
                if op.prev != head:
                    raise ChainError(
                        f"op ({op.origin!r}, {op.seq}) does not extend its origin's chain"
                    )
                heads[op.origin] = (op.seq, op_hash(op))
        applied = duplicates = pending = rejected = 0
        fresh: list[Op] = []
        for op in ops:
            if self._held(op.origin, op.seq) is not None or self._pending_op(op) is not None:
                duplicates += 1
                continue
            self.pending.setdefault(op.origin, {})[op.seq] = op
        for origin in {op.origin for op in ops}:
            queue = self.pending.get(origin, {})
            while True:
                n, head = self._head(origin)
                nxt = queue.get(n + 1)
                if nxt is None or nxt.prev != head:
                    break
                verdict, reason = self.zones.judge(nxt)
                if verdict is Verdict.WAIT:
                    break
                del queue[n + 1]
                self._append(nxt)
                if verdict is Verdict.REJECT:
                    self.rejected[nxt.id] = reason
                    rejected += 1
                else:
                    self._merge(nxt)
                    fresh.append(nxt)
                    applied += 1
            if not queue:
                self.pending.pop(origin, None)
        pending = sum(1 for op in ops if self._pending_op(op) is not None)
        for listener in self.listeners:
            listener(fresh)
        return ApplyResult(
            applied=applied, duplicates=duplicates, pending=pending, rejected=rejected
        )

    async def acknowledge(self, peer: str, vv: Mapping[str, int]) -> None:
        """Record what ``peer`` acknowledged holding (never moving backwards)."""
        cur = self.acks.setdefault(peer, {})
        for origin, seq in vv.items():
            if seq > cur.get(origin, 0):
                cur[origin] = seq

    async def peer_ack(self, peer: str) -> VersionVector:
        """The last version vector ``peer`` acknowledged."""
        return dict(self.acks.get(peer, {}))

    # -- local writes and reads -----------------------------------------------------

    def put(self, key: str, value: Any) -> Op:
        """Write ``key`` locally (zone-checked) and return the op."""
        zone, epoch = self.zones.zone_for_write(self._node_id, key)
        n, head = self._head(self._node_id)
        op = Op(
            origin=self._node_id,
            seq=n + 1,
            hlc=self.clock.now(),
            zone=zone,
            epoch=epoch,
            key=key,
            kind="lww",
            value=encode_value(value),
            prev=head,
        )
        self._append(op)
        self._merge(op)
        for listener in self.listeners:
            listener([op])
        return op

    def get(self, key: str) -> Any:
        """The current value of ``key`` (None if unset)."""
        entry = self.state.get(key)
        return decode_value(entry[2]) if entry else None

    def scan(self, prefix: str = "") -> dict[str, Any]:
        """Every key under ``prefix`` with its value."""
        return {
            k: decode_value(v[2]) for k, v in sorted(self.state.items()) if k.startswith(prefix)
        }

    def all_ops(self) -> list[Op]:
        """Every held op, by origin then seq."""
        return [op for origin in sorted(self.chains) for op in self.chains[origin]]

    # -- internals ------------------------------------------------------------------

    def _head(self, origin: str) -> tuple[int, bytes]:
        hashes = self.hashes.get(origin)
        return (len(hashes), hashes[-1]) if hashes else (0, GENESIS)

    def _held(self, origin: str, seq: int) -> Op | None:
        chain = self.chains.get(origin)
        return chain[seq - 1] if chain and seq <= len(chain) else None

    def _pending_op(self, op: Op) -> Op | None:
        return self.pending.get(op.origin, {}).get(op.seq)

    def _append(self, op: Op) -> None:
        self.chains.setdefault(op.origin, []).append(op)
        self.hashes.setdefault(op.origin, []).append(op_hash(op))

    def _merge(self, op: Op) -> None:
        self.apply_count[op.id] = self.apply_count.get(op.id, 0) + 1
        self.applied_ids.add(op.id)
        cur = self.state.get(op.key)
        if cur is None or (op.hlc, op.origin) > (cur[0], cur[1]):
            self.state[op.key] = (op.hlc, op.origin, op.value)
        self.clock.advance_to(op.hlc)
