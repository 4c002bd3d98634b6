"""Building valid op chains for tests and the simulator."""

from __future__ import annotations

from syncfw.log import GENESIS, Op, encode_value, op_hash

__all__ = ["OpWriter", "chain"]


class OpWriter:
    """Writes one origin's ops with correct seq and ``prev`` hashes.

    Args:
        origin: the writing node's id.
        zone: zone every op names; defaults to the node's own ``fleet/<origin>/``.
    """

    __slots__ = ("_prev", "origin", "seq", "zone")

    def __init__(self, origin: str, zone: str | None = None) -> None:
        self.origin = origin
        self.zone = zone if zone is not None else f"fleet/{origin}/"
        self.seq = 0
        self._prev = GENESIS

    def write(self, key: str, value: object, *, hlc: int | None = None, kind: str = "lww") -> Op:
        """The next op of this origin, setting ``zone + key`` to ``value``."""
        self.seq += 1
        op = Op(
            origin=self.origin,
            seq=self.seq,
            hlc=hlc if hlc is not None else self.seq,
            zone=self.zone,
            epoch=0,
            key=self.zone + key,
            kind=kind,
            value=encode_value(value),
            prev=self._prev,
        )
        self._prev = op_hash(op)
        return op


def chain(origin: str, n: int, *, value_size: int = 8) -> list[Op]:
    """``n`` chained ops of ``origin`` with values of about ``value_size`` bytes."""
    writer = OpWriter(origin)
    return [writer.write(f"k{i}", "x" * value_size) for i in range(n)]
