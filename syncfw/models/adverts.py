"""What each node says it holds: one small op per artifact in its own zone.

``fleet/<node>/artifacts/<sha256>`` holds ``{"name", "version", "n", "have"}``:
the artifact's chunk count and a bitmap of the chunks the node holds
(``b""``: all of them). Gossip carries it like any op, so a yard learns who
already has which chunks and shares one download from the depot.

An advert is a claim, never trusted for bytes: every chunk is hashed on
arrival, and a peer that advertises what it does not serve is skipped.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from syncfw.keys import FLEET_TEMPLATE, fleet_key

__all__ = [
    "ADVERT_NAME",
    "Advert",
    "advert_key",
    "advert_value",
    "bitmap",
    "parse_adverts",
]

ADVERT_NAME = "artifacts/"
"""Under a node's fleet zone: ``fleet/<node>/artifacts/<sha256>``."""
_FLEET_HEAD = FLEET_TEMPLATE.partition("{node}")[0]
_MAX_CHUNKS = 1 << 20


def advert_key(node_id: str, sha256: str) -> str:
    """``fleet/<node>/artifacts/<sha256>``."""
    return fleet_key(node_id, ADVERT_NAME + sha256)


def bitmap(held: Iterable[int], n: int) -> bytes:
    """A bitmap of ``held`` chunk indexes out of ``n`` (``b""`` when all are held)."""
    bits = bytearray((n + 7) // 8)
    count = 0
    for i in set(held):
        if 0 <= i < n:
            bits[i // 8] |= 1 << (i % 8)
            count += 1
    return b"" if count == n else bytes(bits)


def advert_value(name: str, version: int, n: int, held: Iterable[int]) -> dict[str, Any]:
    """The value a node writes at :func:`advert_key`."""
    return {"name": name, "version": version, "n": n, "have": bitmap(held, n)}


@dataclass(frozen=True, slots=True)
class Advert:
    """One node's claim about one artifact.

    Attributes:
        node_id: who claims it.
        sha256: the artifact.
        n: its chunk count.
        have: the bitmap (``b""``: every chunk).
    """

    node_id: str
    sha256: str
    n: int
    have: bytes

    @property
    def complete(self) -> bool:
        """True if it claims every chunk."""
        return self.have == b""

    def mask(self) -> int:
        """The claimed chunks as an int, bit ``i`` for chunk ``i`` (all bits if complete);
        bits at ``n`` and beyond mean nothing: test ``0 <= i < n`` first, as :meth:`holds`."""
        return -1 if self.complete else int.from_bytes(self.have, "little")

    def holds(self, index: int) -> bool:
        """True if it claims chunk ``index``."""
        return 0 <= index < self.n and bool(self.mask() >> index & 1)

    def count(self) -> int:
        """How many chunks it claims."""
        if self.complete:
            return self.n
        return sum(bin(b).count("1") for b in self.have)


def parse_adverts(state: Mapping[str, Any], sha256: str) -> list[Advert]:
    """Every node's advert for ``sha256`` in a ``scan("fleet/")`` result.

    Malformed entries are skipped (a node running other code must not stop a fetch).
    """
    out: list[Advert] = []
    suffix = "/" + ADVERT_NAME + sha256
    for key, value in state.items():
        if not (key.startswith(_FLEET_HEAD) and key.endswith(suffix)):
            continue
        node = key[len(_FLEET_HEAD) : len(key) - len(suffix)]
        if not node or "/" in node or not isinstance(value, Mapping):
            continue
        n, have = value.get("n"), value.get("have")
        if type(n) is not int or not 0 < n <= _MAX_CHUNKS or not isinstance(have, bytes):
            continue
        if have and len(have) != (n + 7) // 8:
            continue
        out.append(Advert(node, sha256, n, have))
    return sorted(out, key=lambda a: a.node_id)
