"""PN-counter with per-origin totals.

State: ``{origin: (p, n)}``. An op carries its origin's new running totals
``[p, n]`` (not a delta), so applying it is a pointwise max: idempotent, and
order-independent across origins. The value is ``sum(p) - sum(n)``.
"""

from __future__ import annotations

from syncfw.crdt.base import CrdtType, OpView, is_u63, pack, unpack
from syncfw.errors import DecodeError

CounterState = dict[str, tuple[int, int]]


def _totals(payload: bytes) -> tuple[int, int]:
    raw = unpack(payload, "counter op")
    try:
        p, n = raw
    except (TypeError, ValueError):
        raise DecodeError("counter op payload must be [p, n]") from None
    if not (is_u63(p) and is_u63(n)):
        raise DecodeError("counter totals must be ints in [0, 2**63)")
    return p, n


class _Counter(CrdtType):
    name = "counter"

    def empty(self) -> CounterState:
        return {}

    def apply(self, state: CounterState, op: OpView) -> CounterState:
        p, n = _totals(op.payload)
        old = state.get(op.origin)
        state[op.origin] = (p, n) if old is None else (max(old[0], p), max(old[1], n))
        return state

    def merge(self, a: CounterState, b: CounterState) -> CounterState:
        out = dict(a)
        for origin, (p, n) in b.items():
            old = out.get(origin)
            out[origin] = (p, n) if old is None else (max(old[0], p), max(old[1], n))
        return out

    def encode(self, state: CounterState) -> bytes:
        return pack([[o, p, n] for o, (p, n) in sorted(state.items())])

    def decode(self, data: bytes) -> CounterState:
        raw = unpack(data, "counter state")
        out: CounterState = {}
        if not isinstance(raw, list):
            raise DecodeError("malformed counter state")
        for row in raw:
            if not (isinstance(row, list) and len(row) == 3):
                raise DecodeError("malformed counter state")
            o, p, n = row
            if not (isinstance(o, str) and is_u63(p) and is_u63(n)):
                raise DecodeError("malformed counter state")
            out[o] = (p, n)
        return out

    def read(self, state: CounterState) -> int:
        return sum(p for p, _ in state.values()) - sum(n for _, n in state.values())

    @staticmethod
    def op_payload(state: CounterState, origin: str, delta: int) -> bytes:
        """Payload of an op by ``origin`` adding ``delta`` to the counter in ``state``."""
        p, n = state.get(origin, (0, 0))
        if delta >= 0:
            p += delta
        else:
            n -= delta
        return pack([p, n])


COUNTER = _Counter()
