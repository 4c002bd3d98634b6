"""Key directories on disk: the fleet authority's and each node's keys and certificates.

Layout (``syncfw keys init-fleet DIR`` / ``syncfw keys add-node DIR NODE``)::

    DIR/fleet.toml              fleet id, authority id (plain text, public)
    DIR/authority.key           ed25519 signing key of the fleet authority (0600)
    DIR/authority.pub           its raw 32-byte public key, hex (public)
    DIR/ca.key                  the fleet CA's private key (0600)
    DIR/ca.crt                  the fleet CA certificate (public)
    DIR/nodes/NODE/node.key     the node's TLS private key (0600)
    DIR/nodes/NODE/node.crt     its X.509 certificate: node id in the SAN and CN
    DIR/nodes/NODE/sign.key     the node's ed25519 op-signing key (0600)
    DIR/nodes/NODE/registration the authority-signed Registration (an op value)

Private keys are written 0600 and never enter the log. A node needs only its own
``nodes/NODE`` folder plus ``ca.crt``, ``authority.pub`` and ``fleet.toml``
(:func:`export_node` copies exactly that).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["NodeKeys"]


@dataclass(frozen=True, slots=True)
class NodeKeys:
    """Everything a node of a signed fleet needs, loaded from its key directory.

    Attributes:
        fleet_id: the fleet.
        authority: the authority's node id.
        authority_key: the authority's raw 32-byte ed25519 public key (goes into
            :attr:`syncfw.zones.Fleet.authority_key`).
        node_id: this node.
        signing_key: this node's ed25519 op-signing key (the authority's own key
            when ``node_id`` is the authority).
        registration: the authority-signed registration op value (b"" for the
            authority, which signs with the bootstrap key).
        ca_pem, cert_pem, key_pem: mutual TLS material (the fleet CA, this node's
            certificate and TLS private key), PEM.
    """

    fleet_id: str
    authority: str
    authority_key: bytes
    node_id: str
    signing_key: Ed25519PrivateKey
    registration: bytes
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
