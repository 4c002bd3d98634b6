"""PN-counter with per-origin totals.

State: ``{origin: (p, n)}``. An op carries its origin's new running totals
``[p, n]`` (not a delta), so applying it is a pointwise max: idempotent, and
order-independent across origins. The value is ``sum(p) - sum(n)``.
"""

from __future__ import annotations

from syncfw.crdt.base import CrdtType, OpView, pack, unpack
from syncfw.errors import DecodeError

CounterState = dict[str, tuple[int, int]]


def _totals(payload: bytes) -> tuple[int, int]:
    raw = unpack(payload, "counter op")
    try:
        p, n = raw
    except (TypeError, ValueError):
        raise DecodeError("counter op payload must be [p, n]") from None
    if type(p) is not int or type(n) is not int or p < 0 or n < 0:
        raise DecodeError("counter totals must be non-negative ints")
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
        try:
            return {str(o): (int(p), int(n)) for o, p, n in unpack(data, "counter state")}
        except (TypeError, ValueError):
            raise DecodeError("malformed counter state") from None

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
