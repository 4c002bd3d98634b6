"""Handles for the non-lww CRDT kinds at one key: counters, add-wins sets, registers.

Each write goes through the node's zone check and the store's group commit;
payloads that depend on the key's current state (a counter's total, an
OR-set's observed tags, a register's superseded values) are computed on the
writer, against the state as of the last commit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from syncfw.crdt import COUNTER, MVREG, ORSET
from syncfw.log import Op, encode_value

if TYPE_CHECKING:
    from syncfw.node.node import Node

__all__ = ["Counter", "ORSet", "Register"]


class Counter:
    """A PN-counter at one key. Each node's increments are its own total."""

    def __init__(self, node: Node, key: str) -> None:
        self._node = node
        self.key = key

    async def add(self, delta: int = 1) -> Op:
        """Add ``delta`` (negative to subtract)."""
        if type(delta) is not int:
            raise TypeError("a counter is changed by whole numbers")
        zone, epoch = self._node._zone(self.key)
        me = self._node.node_id
        return await self._node.store.write(
            COUNTER.name, self.key, zone, epoch, lambda s: COUNTER.op_payload(s, me, delta)
        )

    async def value(self) -> int:
        return int(COUNTER.read(await self._node.store.read_state(COUNTER.name, self.key)))


class ORSet:
    """An add-wins observed-remove set at one key."""

    def __init__(self, node: Node, key: str) -> None:
        self._node = node
        self.key = key

    async def add(self, element: Any) -> Op:
        zone, epoch = self._node._zone(self.key)
        payload = ORSET.add_payload(encode_value(element))
        return await self._node.store.write(ORSET.name, self.key, zone, epoch, payload)

    async def remove(self, element: Any) -> Op:
        """Remove ``element`` as observed here; a concurrent add elsewhere survives."""
        zone, epoch = self._node._zone(self.key)
        packed = encode_value(element)
        return await self._node.store.write(
            ORSET.name, self.key, zone, epoch, lambda s: ORSET.remove_payload(s, packed)
        )

    async def items(self) -> list[Any]:
        """Present elements, in a deterministic order."""
        return ORSET.items(await self._node.store.read_state(ORSET.name, self.key))

    async def contains(self, element: Any) -> bool:
        state = await self._node.store.read_state(ORSET.name, self.key)
        return encode_value(element) in ORSET.read(state)


class Register:
    """A multi-value register at one key: concurrent writes are all kept."""

    def __init__(self, node: Node, key: str) -> None:
        self._node = node
        self.key = key

    async def set(self, value: Any) -> Op:
        """Write ``value``, superseding every value visible here."""
        zone, epoch = self._node._zone(self.key)
        packed = encode_value(value)
        return await self._node.store.write(
            MVREG.name, self.key, zone, epoch, lambda s: MVREG.write_payload(s, packed)
        )

    async def values(self) -> list[Any]:
        """Surviving values, oldest first (more than one after concurrent writes)."""
        return MVREG.values(await self._node.store.read_state(MVREG.name, self.key))
