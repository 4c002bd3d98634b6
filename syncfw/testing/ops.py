"""Building valid op chains for tests, the simulator and :func:`check_replica`.

:class:`OpWriter` mints through :class:`syncfw.log.OpChain`, the one place
that assigns ``seq`` and ``prev``, so a test's ops chain exactly as a node's.
"""

from __future__ import annotations

from syncfw.crdt.lww import TOMBSTONE
from syncfw.log import Op, OpChain, Signer, encode_value

__all__ = ["OpWriter", "chain"]


class OpWriter:
    """Writes one origin's ops with correct seq and ``prev`` hashes.

    Args:
        origin: the writing node's id.
        zone: zone every op names; defaults to the node's own ``fleet/<origin>/``.
            Keys are written under it (``zone + key``).
        epoch: the zone epoch every op names (0: a bootstrap or per-node zone).
        signer: seals every op as its chain head (see :meth:`OpChain.seal`).
    """

    __slots__ = ("_chain", "epoch", "zone")

    def __init__(
        self, origin: str, zone: str | None = None, *, epoch: int = 0, signer: Signer | None = None
    ) -> None:
        self._chain = OpChain(origin, signer=signer)
        self.zone = zone if zone is not None else f"fleet/{origin}/"
        self.epoch = epoch

    @property
    def origin(self) -> str:
        """The writing node's id."""
        return self._chain.origin

    @property
    def seq(self) -> int:
        """The seq of the last op written (0 before the first)."""
        return self._chain.tip[0]

    def write(
        self,
        key: str,
        value: object,
        *,
        hlc: int | None = None,
        kind: str = "lww",
        zone: str | None = None,
        epoch: int | None = None,
    ) -> Op:
        """The next op of this origin, setting ``zone + key`` to ``value``.

        Args:
            key: the key, relative to the zone.
            value: any msgpack-able value (encoded here).
            hlc: the op's timestamp; defaults to its seq (ordered, tiny, never skewed).
            kind: the CRDT kind the op names.
            zone: the zone to name for this op, instead of the writer's.
            epoch: the zone epoch to name, instead of the writer's.

        Raises:
            ValueEncodingError: ``value`` cannot be encoded.
        """
        return self._mint(key, encode_value(value), hlc, kind, zone, epoch)

    def delete(self, key: str, *, hlc: int | None = None, zone: str | None = None) -> Op:
        """The next op of this origin: an lww tombstone for ``zone + key``."""
        return self._mint(key, TOMBSTONE, hlc, "lww", zone, None)

    def _mint(
        self,
        key: str,
        payload: bytes,
        hlc: int | None,
        kind: str,
        zone: str | None,
        epoch: int | None,
    ) -> Op:
        zone = self.zone if zone is None else zone
        op = self._chain.mint(
            hlc if hlc is not None else self.seq + 1,
            zone,
            self.epoch if epoch is None else epoch,
            zone + key,
            kind,
            payload,
        )
        return self._chain.seal(op)


def chain(origin: str, n: int, *, value_size: int = 8) -> list[Op]:
    """``n`` chained ops of ``origin`` with values of about ``value_size`` bytes."""
    writer = OpWriter(origin)
    return [writer.write(f"k{i}", "x" * value_size) for i in range(n)]
