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
(:func:`export_node` copies exactly that; the authority node also gets
``authority.key``, which is its signing key).

Invariants:

1. A private key file readable by group or others is refused at load
   (:class:`~syncfw.errors.KeyFileError` naming the file and the ``chmod`` that
   fixes it); every private key is written 0600 in a folder made 0700.
2. Every missing, unreadable or corrupt file is a :class:`KeyFileError` that
   names it; nothing here raises a bare ``OSError`` or ``ValueError``.
3. What is loaded is checked against itself: the node's registration verifies
   against the authority key and names this node and this signing key; the
   certificate names the node and chains to the fleet CA.
4. Nothing is overwritten: ``init-fleet`` refuses a folder that already holds a
   fleet, ``add-node`` a node that already has keys (a rotation is
   ``from_seq > 1`` and keeps the old registration beside the new one).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import stat
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from syncfw.errors import KeyFileError, TrustError
from syncfw.log import NODE_ID_RE
from syncfw.trust.statements import (
    Registration,
    Revocation,
    open_statement,
    public_key_bytes,
    seal_statement,
)

__all__ = [
    "CA_DAYS",
    "NODE_DAYS",
    "FleetTrust",
    "NodeKeys",
    "add_node",
    "certificate_identity",
    "export_node",
    "init_fleet",
    "load_fleet",
    "load_node",
    "revoke",
]

CA_DAYS = 3650
"""How long a fleet CA is valid by default."""
NODE_DAYS = 365
"""How long a node certificate (and its registration) is valid by default."""

_FLEET = "fleet.toml"
_AUTH_KEY = "authority.key"
_AUTH_PUB = "authority.pub"
_CA_KEY = "ca.key"
_CA_CRT = "ca.crt"
_NODE_KEY = "node.key"
_NODE_CRT = "node.crt"
_SIGN_KEY = "sign.key"
_REG = "registration"


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


# -------------------------------------------------------------- files


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 (never readable by others, not even for an instant)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)  # the umask may have taken bits away, never added them


def _write_public(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _mkdir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} is missing") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _read_private(path: Path, what: str) -> bytes:
    """Read a private key file, refusing one that group or others can read (invariant 1)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"{what} {path} is missing") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{what} {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"a private key must be private: chmod 600 {path}"
        )
    return _read(path, what)


def _load_ed25519(path: Path, what: str) -> Ed25519PrivateKey:
    data = _read_private(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{what} {path} is not a PEM private key (corrupt?)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{what} {path} is not an ed25519 key")
    return key


def _pem_private(key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_cert(path: Path, what: str) -> x509.Certificate:
    data = _read(path, what)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise KeyFileError(f"{what} {path} is not a PEM X.509 certificate (corrupt?)") from None


def _check_node_id(node: str) -> None:
    if not isinstance(node, str) or NODE_ID_RE.fullmatch(node) is None:
        raise KeyFileError(
            f"{str(node)[:64]!r} is not a node id (letters, digits and . _ : @ + -, "
            "at most 256 characters, starting with a letter or digit)"
        )


class _FleetLike(Protocol):
    @property
    def fleet_id(self) -> str: ...
    @property
    def authority(self) -> str: ...
    @property
    def authority_key(self) -> bytes: ...


F = TypeVar("F", bound=_FleetLike)


@dataclass(frozen=True, slots=True)
class FleetTrust:
    """The trust part of a fleet bootstrap, as a key directory holds it.

    Attributes:
        fleet_id: the fleet.
        authority: the authority's node id.
        authority_key: the authority's raw 32-byte ed25519 public key.
    """

    fleet_id: str
    authority: str
    authority_key: bytes

    def bind(self, fleet: F) -> F:
        """``fleet`` (a :class:`syncfw.zones.Fleet`) with this authority key.

        Raises:
            KeyFileError: ``fleet`` is another fleet, has another authority, or
                names another authority key.
        """
        if (fleet.fleet_id, fleet.authority) != (self.fleet_id, self.authority):
            raise KeyFileError(
                f"the keys are for fleet {self.fleet_id!r} (authority {self.authority!r}), "
                f"not {fleet.fleet_id!r} (authority {fleet.authority!r})"
            )
        if fleet.authority_key and fleet.authority_key != self.authority_key:
            raise KeyFileError("the fleet bootstrap names another authority key than the keys")
        out: Any = dataclasses.replace(fleet, authority_key=self.authority_key)  # type: ignore[type-var]
        return out  # type: ignore[no-any-return]


def _fleet_info(root: Path) -> FleetTrust:
    path = root / _FLEET
    raw = _read(path, "fleet file")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
        fleet_id, authority = doc["fleet_id"], doc["authority"]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError):
        raise KeyFileError(f"fleet file {path} is corrupt (needs fleet_id and authority)") from None
    if not (isinstance(fleet_id, str) and isinstance(authority, str) and fleet_id):
        raise KeyFileError(f"fleet file {path}: fleet_id and authority must be strings")
    pub_path = root / _AUTH_PUB
    try:
        key = bytes.fromhex(_read(pub_path, "authority public key").decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(f"authority public key {pub_path} is not hex") from None
    if len(key) != 32:
        raise KeyFileError(f"authority public key {pub_path} is not 32 bytes")
    return FleetTrust(fleet_id, authority, key)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


# -------------------------------------------------------------- fleet


def init_fleet(
    root: str | Path, fleet_id: str, authority: str = "cloud", *, valid_days: int = CA_DAYS
) -> FleetTrust:
    """Create a fleet key directory: the authority's signing key and the fleet CA.

    Args:
        root: the directory (created if missing; refused if it holds a fleet).
        fleet_id: the fleet's id.
        authority: the authority's node id (it signs with the authority key; give
            it TLS keys with :func:`add_node` like any node).
        valid_days: how long the CA certificate is valid.

    Returns:
        The fleet bootstrap's trust part (id, authority, authority key);
        :meth:`FleetTrust.bind` puts the key into the fleet's :class:`~syncfw.zones.Fleet`.

    Raises:
        KeyFileError: ``root`` already holds a fleet, or an id is not valid.
    """
    root = Path(root)
    _check_node_id(authority)
    if not fleet_id or "\n" in fleet_id:
        raise KeyFileError(f"{fleet_id!r} is not a fleet id")
    if (root / _FLEET).exists():
        raise KeyFileError(f"{root} already holds a fleet ({root / _FLEET}); nothing was changed")
    _mkdir(root)
    signing = Ed25519PrivateKey.generate()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"syncfw fleet {fleet_id[:40]} CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "syncfw"),
        ]
    )
    now = _now()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(root / _AUTH_KEY, _pem_private(signing))
    _write_private(root / _CA_KEY, _pem_private(ca_key))
    _write_public(root / _AUTH_PUB, public_key_bytes(signing).hex().encode() + b"\n")
    _write_public(root / _CA_CRT, ca.public_bytes(serialization.Encoding.PEM))
    _write_public(
        root / _FLEET,
        f"fleet_id = {_toml_str(fleet_id)}\nauthority = {_toml_str(authority)}\n".encode(),
    )
    return FleetTrust(fleet_id, authority, public_key_bytes(signing))


def load_fleet(root: str | Path) -> FleetTrust:
    """The fleet's id, authority and authority key, from a fleet or node directory.

    ``load_fleet(DIR).bind(fleet)`` is the fleet bootstrap with the authority key
    every node verifies statements and signed heads against from genesis.

    Raises:
        KeyFileError: ``fleet.toml`` or ``authority.pub`` is missing or corrupt.
    """
    return _fleet_info(Path(root))


def _authority_key(root: Path) -> Ed25519PrivateKey:
    key = _load_ed25519(root / _AUTH_KEY, "authority signing key")
    if public_key_bytes(key) != _fleet_info(root).authority_key:
        raise KeyFileError(f"{root / _AUTH_KEY} does not match {root / _AUTH_PUB}")
    return key


# -------------------------------------------------------------- nodes


def _issue_cert(
    root: Path, node: str, key: ec.EllipticCurvePrivateKey, valid_days: int
) -> x509.Certificate:
    ca_key_data = _read_private(root / _CA_KEY, "fleet CA key")
    try:
        ca_key = serialization.load_pem_private_key(ca_key_data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"fleet CA key {root / _CA_KEY} is not a PEM private key") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"fleet CA key {root / _CA_KEY} is not an ECDSA key")
    ca = _load_cert(root / _CA_CRT, "fleet CA certificate")
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=valid_days), ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def add_node(
    root: str | Path, node: str, *, valid_days: int = NODE_DAYS, from_seq: int = 1
) -> Path:
    """Issue a node's keys: TLS key and certificate, op-signing key, registration.

    Args:
        root: the fleet directory (:func:`init_fleet`).
        node: the node id (in the certificate's SAN, as a DNS name, and CN).
        valid_days: validity of the certificate and of the registration (ops
            stamped later are refused; 0 for a registration with no end).
        from_seq: first seq of the node's chain the new signing key may sign.
            1 for a new node; a larger one rotates the key of a node that has
            one (the old registration is kept as ``registration.<n>``).

    Returns:
        The node's folder (``root/nodes/NODE``).

    Raises:
        KeyFileError: not a fleet directory, a bad id (one starting ``sub:``
            included: :data:`SUBSCRIBER_PREFIX`), the node exists (and this is
            no rotation), or a rotation of a node that has no keys.
    """
    root = Path(root)
    _check_node_id(node)
    if is_subscriber(node):
        raise KeyFileError(
            f"{node[:64]!r}: ids starting {SUBSCRIBER_PREFIX!r} name change-feed subscribers, "
            "which never write; a node cannot have one (for a subscriber: syncfw keys "
            "add-subscriber DIR NAME)"
        )
    if from_seq < 1:
        raise KeyFileError("from_seq must be >= 1")
    info = _fleet_info(root)
    folder = root / "nodes" / node
    rotate = from_seq > 1
    if rotate != folder.exists():
        if rotate:
            raise KeyFileError(f"node {node!r} has no keys in {root} to rotate")
        raise KeyFileError(
            f"node {node!r} already has keys in {folder}; to rotate its signing key, "
            "give the seq it starts at (from_seq)"
        )
    if node == info.authority and rotate:
        raise KeyFileError("the authority signs with the fleet's authority key; it has no rotation")
    authority = _authority_key(root)
    staging = root / "nodes" / f".{node}.new"
    if staging.exists():
        shutil.rmtree(staging)
    _mkdir(staging)
    try:
        tls_key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue_cert(root, node, tls_key, valid_days)
        _write_private(staging / _NODE_KEY, _pem_private(tls_key))
        _write_public(staging / _NODE_CRT, cert.public_bytes(serialization.Encoding.PEM))
        if node != info.authority:
            signing = Ed25519PrivateKey.generate()
            issued = int(time.time() * 1000)
            reg = Registration(
                info.fleet_id, node, public_key_bytes(signing), from_seq,
                issued + valid_days * 86_400_000 if valid_days else 0, issued,
            )
            _write_private(staging / _SIGN_KEY, _pem_private(signing))
            _write_public(staging / _REG, seal_statement(authority, reg))
        if rotate:
            old = sorted(p.name for p in folder.glob(f"{_REG}.*"))
            keep = folder / f"{_REG}.{len(old) + 1}"
            shutil.copy2(folder / _REG, keep)
            for name in (_NODE_KEY, _NODE_CRT, _SIGN_KEY, _REG):
                os.replace(staging / name, folder / name)
            staging.rmdir()
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def certificate_identity(cert_pem: bytes) -> tuple[str, tuple[str, ...]]:
    """The node id a certificate names (its CN) and its DNS SANs.

    Raises:
        KeyFileError: not a PEM certificate, or no CN.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise KeyFileError("not a PEM X.509 certificate") from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise KeyFileError("the certificate names no node (no CN)")
    try:
        sans = tuple(
            str(n)
            for n in cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.DNSName)
        )
    except x509.ExtensionNotFound:
        sans = ()
    return str(cns[0].value), sans


def load_node(root: str | Path, node: str) -> NodeKeys:
    """A node's keys, from the fleet directory or the node's exported one.

    Every file is checked (invariant 3): the registration verifies against the
    authority key and names this node and signing key; the certificate names
    the node (CN and SAN) and was issued by the fleet CA.

    Raises:
        KeyFileError: a file is missing, corrupt, unsafe (0600, invariant 1) or
            does not belong with the others, naming it.
    """
    root = Path(root)
    _check_node_id(node)
    info = _fleet_info(root)
    folder = root / "nodes" / node
    if not folder.is_dir():
        raise KeyFileError(f"no keys for node {node!r} in {root} (syncfw keys add-node {root} {node})")
    ca_pem = _read(root / _CA_CRT, "fleet CA certificate")
    cert_pem = _read(folder / _NODE_CRT, "node certificate")
    key_pem = _read_private(folder / _NODE_KEY, "node TLS key")
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"node TLS key {folder / _NODE_KEY} is not a PEM private key") from None
    cert = _load_cert(folder / _NODE_CRT, "node certificate")
    ca = _load_cert(root / _CA_CRT, "fleet CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as exc:  # InvalidSignature, ValueError, TypeError: no common base
        raise KeyFileError(
            f"node certificate {folder / _NODE_CRT} was not issued by {root / _CA_CRT}: {exc!r}"
        ) from None
    cn, sans = certificate_identity(cert_pem)
    if cn != node or node not in sans:
        raise KeyFileError(f"node certificate {folder / _NODE_CRT} names {cn!r}, not {node!r}")
    if node == info.authority:
        signing = _authority_key(root)
        registration = b""
    else:
        signing = _load_ed25519(folder / _SIGN_KEY, "op-signing key")
        registration = _read(folder / _REG, "registration")
        try:
            reg = open_statement(registration, info.authority_key, info.fleet_id)
        except TrustError as exc:
            raise KeyFileError(f"registration {folder / _REG} does not verify: {exc}") from None
        if not isinstance(reg, Registration) or reg.node != node:
            raise KeyFileError(f"registration {folder / _REG} is not {node!r}'s registration")
        if reg.public_key != public_key_bytes(signing):
            raise KeyFileError(
                f"registration {folder / _REG} names another key than {folder / _SIGN_KEY}"
            )
    return NodeKeys(
        info.fleet_id, info.authority, info.authority_key, node, signing, registration,
        ca_pem, cert_pem, key_pem,
    )


def revoke(root: str | Path, node: str, after_seq: int) -> bytes:
    """The authority's sealed :class:`Revocation` of ``node``'s current signing key.

    Ops of ``node`` past ``after_seq`` signed by that key are rejected wherever
    the statement is known; publish it with :meth:`syncfw.node.Node.publish` on the
    authority node (``syncfw keys publish``).

    Raises:
        KeyFileError: not a fleet directory with the authority key, or the node
            has no registration there.
    """
    root = Path(root)
    _check_node_id(node)
    if after_seq < 0:
        raise KeyFileError("after_seq must be >= 0")
    info = _fleet_info(root)
    if node == info.authority:
        raise KeyFileError("the authority's key is the fleet bootstrap's; it cannot be revoked")
    authority = _authority_key(root)
    path = root / "nodes" / node / _REG
    try:
        reg = open_statement(_read(path, "registration"), info.authority_key, info.fleet_id)
    except TrustError as exc:
        raise KeyFileError(f"registration {path} does not verify: {exc}") from None
    if not isinstance(reg, Registration):
        raise KeyFileError(f"{path} is not a registration")
    statement = Revocation(info.fleet_id, node, reg.public_key, after_seq, int(time.time() * 1000))
    return seal_statement(authority, statement)


def export_node(root: str | Path, node: str, out: str | Path) -> Path:
    """Copy what ``node`` needs (and nothing else) into ``out``, keeping 0600.

    ``out`` gets ``fleet.toml``, ``authority.pub``, ``ca.crt`` and
    ``nodes/NODE/``; for the authority node also ``authority.key``. Never the CA
    key, never another node's keys.

    Raises:
        KeyFileError: the node has no keys, or ``out`` already holds a fleet.
    """
    root, out = Path(root), Path(out)
    keys = load_node(root, node)  # everything it needs is there and sound
    if (out / _FLEET).exists():
        raise KeyFileError(f"{out} already holds a fleet directory; nothing was copied")
    _mkdir(out / "nodes" / node)
    for name in (_FLEET, _AUTH_PUB, _CA_CRT):
        _write_public(out / name, _read(root / name, name))
    if node == keys.authority:
        _write_private(out / _AUTH_KEY, _read_private(root / _AUTH_KEY, "authority signing key"))
    src, dst = root / "nodes" / node, out / "nodes" / node
    for path in sorted(src.iterdir()):
        if not path.is_file():
            continue
        if path.name in (_NODE_KEY, _SIGN_KEY):
            _write_private(dst / path.name, _read_private(path, path.name))
        else:
            _write_public(dst / path.name, _read(path, path.name))
    return out


# -------------------------------------------------------------- feed subscribers

SUBSCRIBER_PREFIX = "sub:"
"""A certificate whose CN starts with this names a change-feed subscriber: it may
read ``syncfw.v1.Feed/Subscribe`` and is refused by ``Sync/Exchange`` (it never writes)."""


def is_subscriber(identity: str) -> bool:
    """True if a certificate identity (CN) names a feed subscriber, not a node."""
    return identity.startswith(SUBSCRIBER_PREFIX)


def add_subscriber(root: str | Path, name: str, *, valid_days: int = NODE_DAYS) -> Path:
    """Issue a read-only change-feed subscriber's TLS key and certificate.

    The certificate's CN is ``sub:<name>`` (:data:`SUBSCRIBER_PREFIX`), it has no
    DNS SAN and only the client-auth usage, and no op-signing key or registration
    is made: it can authenticate to the feed, never sign or sync an op.
    Files: ``root/subscribers/NAME/{node.key, node.crt}`` (the key 0600).

    Returns:
        The subscriber's folder.

    Raises:
        KeyFileError: not a fleet directory, a bad name, or the name exists.
    """
    root = Path(root)
    _check_node_id(name)
    _fleet_info(root)
    folder = root / "subscribers" / name
    if folder.exists():
        raise KeyFileError(f"subscriber {name!r} already has keys in {folder}")
    try:
        ca_key = serialization.load_pem_private_key(
            _read_private(root / _CA_KEY, "fleet CA key"), password=None
        )
    except (ValueError, TypeError):
        raise KeyFileError(f"fleet CA key {root / _CA_KEY} is not a PEM private key") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"fleet CA key {root / _CA_KEY} is not an ECDSA key")
    ca = _load_cert(root / _CA_CRT, "fleet CA certificate")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SUBSCRIBER_PREFIX + name)])
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=valid_days), ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _mkdir(folder.parent)
    _mkdir(folder)
    _write_private(folder / _NODE_KEY, _pem_private(key))
    _write_public(folder / _NODE_CRT, cert.public_bytes(serialization.Encoding.PEM))
    return folder
