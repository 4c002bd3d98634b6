"""``syncfw keys``: the fleet's key directory (authority key, fleet CA, node keys).

Verbs: ``init-fleet DIR``, ``add-node DIR NODE``, ``add-subscriber DIR NAME``,
``export DIR NODE OUT``, ``revoke DIR NODE --after-seq N``, ``show DIR``. The files and their checks are
:mod:`syncfw.keyfiles`'s; this module parses and prints. :func:`node_keys`
is what ``syncfw node serve --keys DIR`` (and the demo) build a node from.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from syncfw.cli.common import fail
from syncfw.errors import KeyFileError, TrustError
from syncfw.keyfiles import (
    NODE_DAYS,
    SUBSCRIBER_PREFIX,
    NodeKeys,
    add_node,
    add_subscriber,
    export_node,
    init_fleet,
    load_fleet,
    load_node,
    revoke,
)
from syncfw.transport.rpc import TlsConfig
from syncfw.trust import Registration, open_statement

if TYPE_CHECKING:
    from syncfw.cli.node_cmd import NodeParts

__all__ = ["node_keys", "register", "tls_of"]


def register(sub: Any) -> None:
    """Add the ``keys`` verb to the ``syncfw`` command."""
    p: argparse.ArgumentParser = sub.add_parser(
        "keys",
        help="make and manage a fleet's keys: authority key, fleet CA, node certificates",
        description="A signed fleet's key directory: the authority's ed25519 key and the "
        "fleet CA (init-fleet), each node's TLS certificate, op-signing key and "
        "authority-signed registration (add-node), what one node needs (export), "
        "revocations (revoke). Private keys are written 0600.",
    )
    verbs = p.add_subparsers(dest="keys_command", metavar="VERB", required=True)
    s = verbs.add_parser("init-fleet", help="create the authority key and the fleet CA in DIR")
    s.add_argument("dir", metavar="DIR", help="the fleet's key directory (created)")
    s.add_argument("--fleet", default="default", help="the fleet id")
    s.add_argument("--authority", default="cloud", help="the authority's node id")
    s.set_defaults(func=_init)
    s = verbs.add_parser(
        "add-node", help="issue a node's certificate, op-signing key and registration"
    )
    s.add_argument("dir", metavar="DIR", help="the fleet's key directory")
    s.add_argument("node", metavar="NODE", help="the node id (in the certificate's CN and SAN)")
    s.add_argument("--valid-days", type=int, default=NODE_DAYS,
                   help="validity of the certificate and the registration")
    s.add_argument("--from-seq", type=int, default=1,
                   help="first seq the signing key signs (>1: rotate an existing node's key)")
    s.set_defaults(func=_add)
    s = verbs.add_parser(
        "add-subscriber",
        help="issue a read-only change-feed subscriber's certificate (CN sub:NAME)",
        description="Issue a TLS key and certificate for a change-feed consumer: its CN is "
        f"'{SUBSCRIBER_PREFIX}NAME', it has only the client-auth usage and no op-signing key "
        "or registration. It may read syncfw.v1.Feed/Subscribe (syncfw cloud tail --keys DIR "
        "--as NAME) and is refused by Sync/Exchange: it never writes. Files: "
        "DIR/subscribers/NAME/{node.key, node.crt}.",
    )
    s.add_argument("dir", metavar="DIR", help="the fleet's key directory (with the CA key)")
    s.add_argument("name", metavar="NAME", help="the subscriber's name (its CN is sub:NAME)")
    s.add_argument("--valid-days", type=int, default=NODE_DAYS,
                   help="validity of the certificate")
    s.set_defaults(func=_add_subscriber)
    s = verbs.add_parser("export", help="copy only what NODE needs into OUT (for its machine)")
    s.add_argument("dir", metavar="DIR", help="the fleet's key directory")
    s.add_argument("node", metavar="NODE", help="the node id")
    s.add_argument("out", metavar="OUT", help="the node's key directory (created)")
    s.set_defaults(func=_export)
    s = verbs.add_parser(
        "revoke",
        help="write the authority's revocation of NODE's key past a seq (publish it after)",
        description="Write an authority-signed revocation: NODE's ops past --after-seq signed "
        "by its current key are rejected everywhere the statement is known. Publish the file "
        "from any node of the fleet with Node.publish(statement) (see the README).",
    )
    s.add_argument("dir", metavar="DIR", help="the fleet's key directory (with authority.key)")
    s.add_argument("node", metavar="NODE", help="the node id")
    s.add_argument("--after-seq", type=int, required=True, metavar="N",
                   help="the last seq of NODE's chain that stays valid")
    s.add_argument("--out", metavar="FILE",
                   help="where to write the statement (default DIR/revocations/NODE.after-N)")
    s.set_defaults(func=_revoke)
    s = verbs.add_parser("show", help="describe a key directory (no private key is printed)")
    s.add_argument("dir", metavar="DIR", help="a fleet's or a node's key directory")
    s.set_defaults(func=_show)


def _guard(verb: str, args: argparse.Namespace, work: Any) -> int:
    try:
        code: int = work(args)
    except (KeyFileError, TrustError) as exc:
        return fail(f"keys {verb}", str(exc), stream=sys.stderr)
    return code


def _init(args: argparse.Namespace) -> int:
    def work(a: argparse.Namespace) -> int:
        trust = init_fleet(a.dir, a.fleet, a.authority)
        print(f"fleet {trust.fleet_id!r}, authority {trust.authority!r}: keys in {a.dir}")
        print(f"authority key {trust.authority_key.hex()}")
        print(f"next: syncfw keys add-node {a.dir} {trust.authority} (and every other node)")
        return 0

    return _guard("init-fleet", args, work)


def _add(args: argparse.Namespace) -> int:
    def work(a: argparse.Namespace) -> int:
        folder = add_node(a.dir, a.node, valid_days=a.valid_days, from_seq=a.from_seq)
        print(f"node {a.node!r}: keys in {folder}")
        return 0

    return _guard("add-node", args, work)


def _add_subscriber(args: argparse.Namespace) -> int:
    def work(a: argparse.Namespace) -> int:
        folder = add_subscriber(a.dir, a.name, valid_days=a.valid_days)
        print(f"subscriber {SUBSCRIBER_PREFIX}{a.name}: certificate in {folder} "
              f"(syncfw cloud tail ADDRESS --keys {a.dir} --as {a.name})")
        return 0

    return _guard("add-subscriber", args, work)


def _export(args: argparse.Namespace) -> int:
    def work(a: argparse.Namespace) -> int:
        out = export_node(a.dir, a.node, a.out)
        print(f"node {a.node!r}: its keys in {out} (syncfw node serve --keys {out})")
        return 0

    return _guard("export", args, work)


def _revoke(args: argparse.Namespace) -> int:
    def work(a: argparse.Namespace) -> int:
        statement = revoke(a.dir, a.node, a.after_seq)
        out = Path(a.out) if a.out else Path(a.dir) / "revocations" / f"{a.node}.after-{a.after_seq}"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise KeyFileError(f"{out} exists; nothing was written") from None
        try:
            os.write(fd, statement)
        finally:
            os.close(fd)
        print(f"revocation of {a.node!r} after seq {a.after_seq}: {out} "
              "(publish it with Node.publish from any node)")
        return 0

    return _guard("revoke", args, work)


def _until(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.not_valid_after_utc.strftime("%Y-%m-%d")


def _show(args: argparse.Namespace) -> int:
    def work(a: argparse.Namespace) -> int:
        root = Path(a.dir)
        trust = load_fleet(root)
        print(f"fleet      {trust.fleet_id}")
        print(f"authority  {trust.authority} (key {trust.authority_key.hex()})")
        ca = root / "ca.crt"
        if ca.exists():
            print(f"fleet CA   until {_until(ca.read_bytes())}"
                  + ("" if (root / "ca.key").exists() else " (no CA key here)"))
        nodes = sorted(p.name for p in (root / "nodes").glob("*") if p.is_dir()
                       and not p.name.startswith("."))
        for node in nodes:
            try:
                keys = load_node(root, node)
            except KeyFileError as exc:
                print(f"node       {node}: BROKEN: {exc}")
                continue
            line = f"node       {node}: certificate until {_until(keys.cert_pem)}"
            if keys.registration:
                reg = open_statement(keys.registration, trust.authority_key, trust.fleet_id)
                assert isinstance(reg, Registration)
                end = (datetime.datetime.fromtimestamp(reg.not_after_ms / 1000, datetime.UTC)
                       .strftime("%Y-%m-%d") if reg.not_after_ms else "no end")
                line += f", signing key {reg.public_key.hex()[:16]}… from seq {reg.from_seq}, {end}"
            else:
                line += ", signs with the authority key"
            print(line)
        if not nodes:
            print("nodes      none yet (syncfw keys add-node)")
        return 0

    return _guard("show", args, work)


def tls_of(keys: NodeKeys) -> TlsConfig:
    """The mutual TLS material of a node's keys."""
    return TlsConfig(keys.ca_pem, keys.cert_pem, keys.key_pem)


def node_keys(root: str | Path, node: str, parts: NodeParts) -> tuple[NodeKeys, NodeParts]:
    """A node's keys from ``root``, and ``parts`` with the fleet's authority key and mTLS.

    Raises:
        KeyFileError: the keys are missing, unsafe or not this fleet's; TLS
            files were given as well.
    """
    keys = load_node(root, node)
    if parts.transport.tls is not None:
        raise KeyFileError("--keys brings the node's TLS certificate: leave out --ca/--cert/--key")
    fleet = load_fleet(root).bind(parts.fleet)
    transport = dataclasses.replace(parts.transport, tls=tls_of(keys))
    return keys, dataclasses.replace(parts, fleet=fleet, transport=transport)
