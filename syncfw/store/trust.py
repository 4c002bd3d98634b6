"""What a signed fleet's store keeps beside the log: fork evidence and the authority's rulings.

The planner decides (:mod:`.planner`: signed walk, pending ``fork``); this
module holds what those decisions read and leave behind, as the store's
``trust`` member:

1. :meth:`StoreTrust.load`: the verified statements (``state`` rows of kind
   ``trust``) re-learned by the key ring, and the stored fork evidence
   (kind ``fork``), at open.
2. :meth:`StoreTrust.kept_branches`: the forked origins whose branch held here
   is the one the authority kept (``forkkeep``); each ruling is checked
   against the held op once, then remembered.
3. :meth:`StoreTrust.record`: a signed conflicting branch paired with this
   store's own signed branch is evidence (verifiable by anyone): stored,
   flagged, counted and returned for the store to gossip; without a signed
   copy here it is discarded (``unsigned_fork``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from syncfw.errors import TrustError
from syncfw.log import Op, op_hash
from syncfw.metrics import NodeMetrics
from syncfw.store import export
from syncfw.store.meter import StoreMeter
from syncfw.store.planner import FORK_STATE, INSERT_STATE_ROW, TRUST_STATE
from syncfw.store.sql import Step
from syncfw.trust import MAX_BRANCH_OPS, ForkEvidence, KeyRing, verify_fork

__all__ = ["StoreTrust"]

log = logging.getLogger("syncfw.store")

Read = Callable[[str, Sequence[Any]], Awaitable[list[Any]]]
Txn = Callable[[Sequence[Step]], Awaitable[int]]


class StoreTrust:
    """Fork evidence and rulings of one store (module docstring).

    Attributes:
        forks: origin -> the seq its verified fork evidence is at (its later ops wait).
        evidence: origin -> that evidence.
    """

    def __init__(self, node_id: str, metrics: NodeMetrics, meter: StoreMeter | None = None) -> None:
        self.node_id = node_id
        self.metrics = metrics
        self.meter = meter
        self.forks: dict[str, int] = {}
        self.evidence: dict[str, ForkEvidence] = {}
        self._kept_checked: dict[str, tuple[tuple[int, bytes], bool]] = {}

    async def load(self, keys: KeyRing, read: Read) -> None:
        """The verified statements and fork evidence kept beside the log (invariant 1)."""
        for (value,) in await read("SELECT data FROM state WHERE kind = ?", (TRUST_STATE,)):
            try:
                keys.learn_value(bytes(value))
            except TrustError as exc:
                log.warning("ignoring a stored statement that does not verify: %s", exc)
        for origin, data in await read("SELECT key, data FROM state WHERE kind = ?", (FORK_STATE,)):
            try:
                ev = ForkEvidence.decode(bytes(data), keys)
            except TrustError as exc:
                log.warning("ignoring stored fork evidence against %s: %s", origin, exc)
                continue
            self.forks[ev.origin] = ev.seq
            self.evidence[ev.origin] = ev

    async def kept_branches(self, keys: KeyRing | None, read: Read) -> frozenset[str]:
        """Forked origins whose branch here is the one the authority kept (invariant 2)."""
        if keys is None or not self.forks or not keys.kept:
            return frozenset()
        out = set()
        for origin in self.forks:
            ruling = keys.kept.get(origin)
            if ruling is None:
                continue
            seq, keep = ruling
            if origin not in self._kept_checked or self._kept_checked[origin][0] != ruling:
                rows = await read(
                    f"SELECT {export.OP_COLUMNS} FROM ops WHERE origin = ? AND seq = ?",
                    (origin, seq),
                )
                ours = op_hash(Op(*rows[0])) if rows else None
                ok = ours == keep
                self._kept_checked[origin] = (ruling, ok)
                if not ok:
                    log.warning(
                        "the authority kept the other branch of %s's fork at seq %d; this node "
                        "holds the dropped one: its ops of %s stay held (restore this node "
                        "from a peer holding the kept branch)",
                        origin,
                        seq,
                        origin,
                    )
            if self._kept_checked[origin][1]:
                out.add(origin)
        return frozenset(out)

    async def record(
        self,
        keys: KeyRing,
        suspects: Sequence[tuple[str, int, tuple[Op, ...]]],
        read: Read,
        txn: Txn,
    ) -> list[ForkEvidence]:
        """Pair each signed conflicting branch with this store's own signed branch; return
        the verified pairs, stored and flagged (invariant 3, DESIGN §3)."""
        found_all: list[ForkEvidence] = []
        for origin, seq, branch in suspects:
            rows = await read(
                f"SELECT {export.OP_COLUMNS} FROM ops WHERE origin = ? AND seq >= ? "
                "ORDER BY seq LIMIT ?",
                (origin, max(1, seq - 1), MAX_BRANCH_OPS),
            )
            mine = [Op(*row) for row in rows]
            found: ForkEvidence | None = None
            for i, op in enumerate(mine):
                if op.sig is None:
                    continue
                try:
                    found = verify_fork(keys, mine[: i + 1], branch)
                    break
                except TrustError:
                    continue
            if found is None:
                if self.meter is not None:
                    self.meter.discard({"unsigned_fork": 1})
                log.warning(
                    "signed ops of %s contradict its chain at seq %d, but this node's own copy "
                    "is compacted or unsigned: the conflicting ops were discarded",
                    origin,
                    seq,
                )
                continue
            await txn([(INSERT_STATE_ROW, [(FORK_STATE, origin, found.encode())])])
            self.forks[origin] = min(self.forks.get(origin, found.seq), found.seq)
            self.evidence.setdefault(origin, found)
            self.metrics.fork_evidence.labels(self.node_id, origin).set(1)
            log.warning(
                "FORK EVIDENCE: the key of %s signed two different histories at seq %d; its "
                "later ops are held until the authority revokes it",
                origin,
                found.seq,
            )
            found_all.append(found)
        return found_all
