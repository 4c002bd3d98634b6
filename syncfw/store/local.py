"""Planning local writes: minted on the store's chain, folded, as one transaction's steps.

The pure half of a group commit (see :mod:`.planner`'s invariants, which hold
here too): :func:`plan_local` takes the group, the store's
:class:`~syncfw.log.OpChain` and clock, the zone table and the states the
group reads, and returns a :class:`LocalPlan`. Nothing here touches SQLite or
asyncio; the store commits the steps and, after COMMIT, applies the tip and
zone table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from syncfw.crdt import lww_wins
from syncfw.errors import ClockError, ValueTooLargeError
from syncfw.log import Op, OpChain, op_size
from syncfw.store.planner import (
    HLC_LIMIT,
    INSERT_STATE_ROW,
    LOG_ONLY_KINDS,
    TRUST_STATE,
    PayloadFn,
)
from syncfw.store.sql import INSERT_OP, UPSERT_HEAD, Step
from syncfw.store.stage import Stage, stage_grant
from syncfw.trust import EVIDENCE_KIND, SEAL_BYTES, SEAL_EVERY
from syncfw.zones import GRANT_KIND, ZoneTable

__all__ = ["LocalPlan", "LocalWrite", "WriteSpec", "check_size", "plan_local"]


class LocalWrite(Protocol):
    """What :func:`plan_local` reads of a write (the writer's jobs have these fields)."""

    @property
    def kind(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def zone(self) -> str: ...
    @property
    def epoch(self) -> int: ...
    @property
    def payload(self) -> bytes | PayloadFn: ...


@dataclass(frozen=True, slots=True)
class WriteSpec:
    """One local write: ``payload`` is bytes, or a function of the key's state."""

    kind: str
    key: str
    zone: str
    epoch: int
    payload: bytes | PayloadFn


@dataclass(frozen=True, slots=True)
class LocalPlan:
    """What a group of local writes does, to be committed as one transaction.

    Attributes:
        ops: the minted ops, in order; the last is sealed (``OpChain.seal``).
        taken: for each op, the index of its write in the planned sequence.
        failed: ``(index, error)`` of each write refused alone.
        steps: the SQL (the clock's high-water step aside).
        start, tip: the chain position before and after the batch.
        zones: the zone table after the batch's grants (None: unchanged).
    """

    ops: tuple[Op, ...]
    taken: tuple[int, ...]
    failed: tuple[tuple[int, BaseException], ...]
    steps: tuple[Step, ...]
    start: tuple[int, bytes]
    tip: tuple[int, bytes]
    zones: ZoneTable | None


def check_size(key: str, payload: bytes | PayloadFn, max_value: int, max_key: int) -> None:
    """Refuse a write whose key or (computed) payload could not travel in one sync batch.

    An op that no batch can carry would stall its origin's stream with every
    peer forever, so it is refused before it is minted.

    Raises:
        ValueTooLargeError: the key or the payload is over its limit.
    """
    if len(key) > max_key // 4 and len(kb := key.encode("utf-8", "surrogatepass")) > max_key:
        raise ValueTooLargeError(
            f"key of {len(kb)} bytes is over the limit of {max_key} bytes "
            f"(StoreConfig.max_key_bytes): {key[:64]!r}...",
            len(kb),
            max_key,
        )
    if not callable(payload) and len(payload) > max_value:
        raise ValueTooLargeError(
            f"value of {len(payload)} bytes for {key[:64]!r} is over the limit of {max_value} "
            "bytes (StoreConfig.max_value_bytes: one op must fit in one sync batch); "
            "nothing was written",
            len(payload),
            max_value,
        )


def _past_limit(hlc: int) -> ClockError:
    return ClockError(f"the hybrid clock is at {hlc}, past what SQLite stores (2**63)")


def plan_local(
    writes: Sequence[LocalWrite | None],
    chain: OpChain,
    stamp: Callable[[], int],
    zones: ZoneTable,
    states: Mapping[tuple[str, str], Any],
    max_value: int = 1 << 62,
) -> LocalPlan:
    """Mint and fold a group of local writes (``None`` entries are skipped).

    One bad write (its payload function raises or returns more than
    ``max_value`` bytes, a grant is invalid, the clock is past
    :data:`HLC_LIMIT`) fails alone; the chain is moved back over it.
    """
    start = chain.tip
    work = dict(states)
    stage = Stage()
    base = zones
    ops: list[Op] = []
    taken: list[int] = []
    failed: list[tuple[int, BaseException]] = []
    lww = stage.lww
    trust_rows: list[tuple[str, str, bytes]] = []
    for i, w in enumerate(writes):
        if w is None:
            continue
        payload = w.payload
        if w.kind == "lww" and not callable(payload):
            # The hot path (a put): nothing below can fail but the clock.
            hlc = stamp()
            if hlc >= HLC_LIMIT:
                failed.append((i, _past_limit(hlc)))
                continue
            op = chain.mint(hlc, w.zone, w.epoch, w.key, "lww", payload)
            cand = (hlc, op.origin, payload)
            if lww_wins(cand, lww.get(op.key)):
                lww[op.key] = cand
            ops.append(op)
            taken.append(i)
            continue
        before = chain.tip
        try:
            if callable(payload):
                # A grant's payload is a function of the zone table (its epoch).
                payload = payload(zones if w.kind == GRANT_KIND else work[(w.kind, w.key)])
                check_size(w.key, payload, max_value, 1 << 62)
            hlc = stamp()
            if hlc >= HLC_LIMIT:
                raise _past_limit(hlc)
            op = chain.mint(hlc, w.zone, w.epoch, w.key, w.kind, payload)
            if op.kind == GRANT_KIND:
                zones = zones.copy() if zones is base else zones
                reason = stage_grant(zones, op, stage)
                if reason is not None:
                    raise ValueError(reason)
            elif op.kind in LOG_ONLY_KINDS:
                # Statements and evidence: the op is the record (the store verified it
                # before queueing and learns it after commit); statements are also
                # kept apart from the log, so compaction never loses a key.
                if op.kind != EVIDENCE_KIND:
                    trust_rows.append((TRUST_STATE, hashlib.sha256(payload).hexdigest(), payload))
            else:
                stage.apply(op, work)
        except Exception as exc:  # one bad write fails alone
            chain.reset(*before)
            failed.append((i, exc))
            continue
        ops.append(op)
        taken.append(i)
    if ops and chain.signer is not None:
        # The signing unit: the group's last op, and within a long group every
        # SEAL_EVERY-th op or SEAL_BYTES of ops, so a receiver never holds more
        # than that waiting for a head (and every sync batch carries one).
        since, size = 0, 0
        for i in range(len(ops) - 1):
            since += 1
            size += op_size(ops[i])
            if since >= SEAL_EVERY or size >= SEAL_BYTES:
                ops[i] = chain.seal(ops[i])
                since, size = 0, 0
        ops[-1] = chain.seal(ops[-1])
    tip = chain.tip
    steps: list[Step] = [(INSERT_OP, [(*op.to_tuple(), 0) for op in ops])]
    steps += stage.steps(work)
    steps.append((INSERT_STATE_ROW, trust_rows))
    steps.append((UPSERT_HEAD, [(chain.origin, *tip)] if ops else []))
    return LocalPlan(
        ops=tuple(ops),
        taken=tuple(taken),
        failed=tuple(failed),
        steps=tuple(s for s in steps if s[1]),
        start=start,
        tip=tip,
        zones=None if zones is base else zones,
    )

