"""Authority statements: key registrations and revocations, self-verifying.

A statement is signed by the fleet authority's ed25519 key, whose public half
every node has from the fleet bootstrap (:attr:`syncfw.zones.Fleet.authority_key`).
It therefore proves itself wherever it travels: an op of kind
:data:`KEYREG_KIND` or :data:`REVOKE_KIND` carries one as its value, and any
replica that sees the op (in any origin's chain) can check it on its own.

Invariants:

1. The signed bytes are a msgpack list that starts with a domain tag
   (``syncfw/keyreg/v1``, ``syncfw/revoke/v1``) and names the fleet, so a
   statement for one purpose or one fleet is never valid for another.
2. The op value is ``msgpack([body, signature])``: the body exactly as signed,
   never re-encoded before verification.
3. Statements are facts, not commands: applying one twice, or learning it from
   two ops, changes nothing (a key ring is a set of verified statements).

Nothing here touches SQLite, asyncio or the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from syncfw.errors import TrustError

__all__ = [
    "KEEP_KIND",
    "KEYREG_KIND",
    "REVOKE_KIND",
    "STATEMENT_KIND_OF",
    "ForkResolution",
    "Registration",
    "Revocation",
    "Statement",
    "open_statement",
    "public_key_bytes",
    "seal_statement",
]

KEYREG_KIND = "keyreg"
"""Op kind whose value is an authority-signed :class:`Registration`."""
REVOKE_KIND = "keyrevoke"
"""Op kind whose value is an authority-signed :class:`Revocation`."""
KEEP_KIND = "forkkeep"
"""Op kind whose value is an authority-signed :class:`ForkResolution`."""

_REG_TAG = "syncfw/keyreg/v1"
_REVOKE_TAG = "syncfw/revoke/v1"
_KEEP_TAG = "syncfw/forkkeep/v1"
MAX_STATEMENT_BYTES = 1024
"""A statement's op value is refused past this size before anything is decoded."""


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte form of an ed25519 public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class Registration:
    """The authority's word that ``public_key`` signs ``node``'s chain from ``from_seq`` on.

    Attributes:
        fleet_id: the fleet this holds in.
        node: the node id.
        public_key: raw 32-byte ed25519 public key.
        from_seq: first seq of ``node``'s chain this key may sign (1 for a new node;
            a rotation registers a new key from a later seq).
        not_after_ms: ops stamped (HLC physical ms) after this are refused; 0: no end.
        issued_ms: when the authority issued it (informational).
    """

    fleet_id: str
    node: str
    public_key: bytes
    from_seq: int = 1
    not_after_ms: int = 0
    issued_ms: int = 0

    def body(self) -> bytes:
        """The bytes the authority signs."""
        return msgpack.packb(
            [_REG_TAG, self.fleet_id, self.node, self.public_key, self.from_seq,
             self.not_after_ms, self.issued_ms],
            use_bin_type=True,
        )


@dataclass(frozen=True, slots=True)
class Revocation:
    """The authority's word that ``public_key`` signs nothing of ``node``'s past ``after_seq``.

    Ops of ``node`` at seq <= ``after_seq`` signed by the key stay valid; later ones
    are rejected (recorded, never merged) wherever the revocation is known.
    """

    fleet_id: str
    node: str
    public_key: bytes
    after_seq: int
    issued_ms: int = 0

    def body(self) -> bytes:
        """The bytes the authority signs."""
        return msgpack.packb(
            [_REVOKE_TAG, self.fleet_id, self.node, self.public_key, self.after_seq, self.issued_ms],
            use_bin_type=True,
        )


@dataclass(frozen=True, slots=True)
class ForkResolution:
    """The authority's word on a fork of ``node``'s chain: keep the branch whose op at
    ``seq`` hashes to ``keep``. Replicas holding that branch lift the hold on ``node``;
    the other branch's ops are discarded from then on.
    """

    fleet_id: str
    node: str
    keep: bytes
    seq: int
    issued_ms: int = 0

    @property
    def public_key(self) -> bytes:
        """The slot a statement's 32-byte field fills (here: the kept op's hash)."""
        return self.keep

    def body(self) -> bytes:
        """The bytes the authority signs."""
        return msgpack.packb(
            [_KEEP_TAG, self.fleet_id, self.node, self.keep, self.seq, self.issued_ms],
            use_bin_type=True,
        )


Statement = Registration | Revocation | ForkResolution

STATEMENT_KIND_OF: dict[type, str] = {
    Registration: KEYREG_KIND,
    Revocation: REVOKE_KIND,
    ForkResolution: KEEP_KIND,
}
"""The op kind that carries each statement type."""


def seal_statement(authority: Ed25519PrivateKey, statement: Statement) -> bytes:
    """The op value carrying ``statement`` signed by ``authority``."""
    body = statement.body()
    return msgpack.packb([body, authority.sign(body)], use_bin_type=True)


def _int(x: Any, what: str) -> int:
    if type(x) is not int or not 0 <= x < 1 << 63:
        raise TrustError(f"statement {what} must be an int in [0, 2**63)")
    return x


def open_statement(value: bytes, authority_key: bytes, fleet_id: str) -> Statement:
    """Verify and decode a statement op's value.

    Args:
        value: the op value (``msgpack([body, signature])``).
        authority_key: the authority's raw 32-byte public key.
        fleet_id: the fleet the statement must name.

    Raises:
        TrustError: malformed, not signed by the authority, or for another fleet.
    """
    if len(value) > MAX_STATEMENT_BYTES:
        raise TrustError(f"statement of {len(value)} bytes exceeds {MAX_STATEMENT_BYTES}")
    try:
        body, sig = msgpack.unpackb(value, raw=False)
    except Exception:  # msgpack raises several unrelated types
        raise TrustError("statement is not msgpack [body, signature]") from None
    if not (isinstance(body, bytes) and isinstance(sig, bytes) and len(sig) == 64):
        raise TrustError("statement is not [body bytes, 64-byte signature]")
    try:
        Ed25519PublicKey.from_public_bytes(authority_key).verify(sig, body)
    except (InvalidSignature, ValueError):
        raise TrustError("statement is not signed by the fleet authority") from None
    try:
        fields = msgpack.unpackb(body, raw=False)
        tag, fleet, node, key, *rest = fields
    except Exception:
        raise TrustError("statement body is malformed") from None
    if fleet != fleet_id:
        raise TrustError(f"statement is for fleet {str(fleet)[:64]!r}, not {fleet_id!r}")
    if not (isinstance(node, str) and isinstance(key, bytes) and len(key) == 32):
        raise TrustError("statement must name a node and a 32-byte key")
    if tag == _REG_TAG and len(rest) == 3:
        from_seq, not_after, issued = (_int(x, "field") for x in rest)
        if from_seq < 1:
            raise TrustError("registration from_seq must be >= 1")
        return Registration(fleet, node, key, from_seq, not_after, issued)
    if tag == _REVOKE_TAG and len(rest) == 2:
        after, issued = (_int(x, "field") for x in rest)
        return Revocation(fleet, node, key, after, issued)
    if tag == _KEEP_TAG and len(rest) == 2:
        seq, issued = (_int(x, "field") for x in rest)
        return ForkResolution(fleet, node, key, seq, issued)
    raise TrustError(f"unknown statement tag {str(tag)[:32]!r}")
