"""Signed fleets for tests, benchmarks and the simulator, made in memory.

``syncfw keys init-fleet``/``add-node`` make the same material on disk (with TLS
certificates); these helpers make only what signed chains need, so a test can
build a signed fleet of any size in milliseconds.
"""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from syncfw.keyfiles import NodeKeys
from syncfw.trust import NodeSigner, Registration, Revocation, public_key_bytes, seal_statement
from syncfw.zones import Fleet

__all__ = ["SignedFleet"]


class SignedFleet:
    """An authority key, a fleet bootstrap that names it, and node keys on demand.

    Args:
        fleet: the bootstrap to sign (its ``authority_key`` is replaced).
    """

    def __init__(self, fleet: Fleet | None = None) -> None:
        base = fleet or Fleet()
        self.authority_key = Ed25519PrivateKey.generate()
        self.fleet = dataclasses.replace(base, authority_key=public_key_bytes(self.authority_key))
        self._keys: dict[str, NodeKeys] = {}

    def keys(self, node_id: str, *, from_seq: int = 1, not_after_ms: int = 0) -> NodeKeys:
        """``node_id``'s keys (made, and registered by the authority, on first use)."""
        got = self._keys.get(node_id)
        if got is not None:
            return got
        f = self.fleet
        if node_id == f.authority:
            got = NodeKeys(
                f.fleet_id, f.authority, f.authority_key, node_id, self.authority_key, b"",
                b"", b"", b"",
            )
        else:
            key = Ed25519PrivateKey.generate()
            got = NodeKeys(
                f.fleet_id, f.authority, f.authority_key, node_id, key,
                self.register(node_id, key, from_seq=from_seq, not_after_ms=not_after_ms),
                b"", b"", b"",
            )
        self._keys[node_id] = got
        return got

    def register(
        self, node_id: str, key: Ed25519PrivateKey, *, from_seq: int = 1, not_after_ms: int = 0
    ) -> bytes:
        """A sealed registration of ``key`` for ``node_id``."""
        reg = Registration(
            self.fleet.fleet_id, node_id, public_key_bytes(key), from_seq, not_after_ms
        )
        return seal_statement(self.authority_key, reg)

    def revoke(self, node_id: str, after_seq: int) -> bytes:
        """A sealed revocation of ``node_id``'s current key past ``after_seq``."""
        keys = self.keys(node_id)
        rev = Revocation(
            self.fleet.fleet_id, node_id, public_key_bytes(keys.signing_key), after_seq
        )
        return seal_statement(self.authority_key, rev)

    def signer(self, node_id: str) -> NodeSigner:
        """``node_id``'s head signer."""
        return NodeSigner(self.fleet.fleet_id, self.keys(node_id).signing_key)
