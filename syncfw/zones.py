"""Owned key zones: who may write where, at which ownership epoch.

Invariants:

1. A zone is a key prefix with a set of owners at an epoch. ``"*"`` among the
   owners makes the zone shared: every node may write and CRDT merge rules
   reconcile the writes.
2. The grant history is append-only: ``(prefix, epoch) -> owners`` never
   changes once known. Grants come only from the fleet bootstrap (identical on
   every node) and from ``grant`` ops written by the fleet authority, which the
   log applies in the authority's seq order, so every replica judges an op
   against the same history and reaches the same verdict.
3. Per-node zones (``Fleet.node_zones``, e.g. ``fleet/{node}/``) are owned by
   that node at epoch 0 on every replica, with no grant op needed.
4. ``sys/`` is owned by the authority at epoch 0; a node never grants itself a
   zone.

5. Zones nest only where every replica knows the nesting from the start: the
   bootstrap grants, ``sys/`` and the per-node templates. An authority grant of
   a *new* prefix that would nest with an existing zone is refused. So "the
   most specific zone covering a key" is the same on every replica, whatever
   grants it has seen, and an op that names a less specific zone than that (a
   way around an owned sub-zone of a shared zone) is rejected everywhere.

Verdicts on a remote op (:meth:`ZoneTable.judge`): ``ACCEPT``; ``REJECT`` with
a reason (recorded, never merged); or ``WAIT`` when the op names an epoch this
replica has not yet seen (held like a gap until the grant arrives). Epoch 0
exists only from the bootstrap, so an unknown epoch-0 zone is rejected at once.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import msgpack

from syncfw.errors import OpError, ZoneOwnershipError
from syncfw.keys import NODE_TEMPLATES
from syncfw.log import Op, is_node_id
from syncfw.trust import KeyRing

__all__ = [
    "ANYONE",
    "GRANT_KIND",
    "SYS_PREFIX",
    "Fleet",
    "Grant",
    "Verdict",
    "ZoneTable",
]

ANYONE = "*"
SYS_PREFIX = "sys/"
GRANT_KIND = "grant"
GRANT_KEY_PREFIX = "sys/zones/"
_SYSTEM_KINDS = frozenset({GRANT_KIND, "keyreg", "keyrevoke", "forkkeep", "evidence"})
"""Kinds that may sit under any prefix: grants, authority statements, fork evidence."""


@dataclass(frozen=True, slots=True)
class Grant:
    """Ownership of a key prefix at an epoch.

    Attributes:
        prefix: the zone, a key prefix such as ``"trucks/t7/"``.
        owners: node ids allowed to write; ``"*"`` means everyone.
        epoch: ownership epoch; a transfer is a grant with a higher epoch.
    """

    prefix: str
    owners: frozenset[str]
    epoch: int = 1

    def __post_init__(self) -> None:
        if not self.prefix:
            raise ValueError("a zone prefix must not be empty")
        if self.epoch < 0:
            raise ValueError("a zone epoch must be >= 0")
        if not self.owners:
            raise ValueError(f"zone {self.prefix!r} needs at least one owner")

    @classmethod
    def of(cls, prefix: str, *owners: str, epoch: int = 1) -> Grant:
        """Shorthand: ``Grant.of("site/", "*")``."""
        return cls(prefix, frozenset(owners), epoch)

    def allows(self, node_id: str) -> bool:
        """True if ``node_id`` may write in this zone at this epoch."""
        return ANYONE in self.owners or node_id in self.owners


@dataclass(frozen=True, slots=True)
class Fleet:
    """What every node of a fleet must agree on before it writes anything.

    Attributes:
        fleet_id: name of the fleet; peers of another fleet are refused.
        authority: node id of the fleet authority (the cloud in production),
            the only node that may grant zones.
        grants: bootstrap grants known to every node at open.
        node_zones: per-node zone templates (``{node}`` is replaced by the node
            id), owned by that node at epoch 0.
        telemetry: prefixes whose ops are telemetry: bounded by retention.
        priorities: ``(prefix, priority)`` pairs; when a sync exchange must
            choose, origins with ops in higher-priority zones are sent first
            (other keys are priority 0).
        kinds: ``(prefix, kind)`` pairs: every key under ``prefix`` holds only
            ``kind`` (``lww``, ``counter``, ``orset``, ``mvreg``, ``ydoc``; the most
            specific prefix wins). A local write of another kind raises
            :class:`~syncfw.errors.OpError`; a remote op of another kind is rejected
            and recorded, identically everywhere (the rule is in the bootstrap, so no
            replica's verdict depends on which op it saw first). Keys under no
            declared prefix keep one state per kind.
        authority_key: the authority's raw 32-byte ed25519 public key. Set, the
            fleet is **signed** (secure mode): every op is applied only once a
            chain head signed by its origin's registered key covers it, and
            registrations, revocations and grants verify against this key
            (:mod:`syncfw.trust`). Empty: an unsigned, development fleet, loudly
            labelled as such in logs, status and metrics.
    """

    fleet_id: str = "default"
    authority: str = "cloud"
    grants: tuple[Grant, ...] = ()
    node_zones: tuple[str, ...] = NODE_TEMPLATES
    telemetry: tuple[str, ...] = ("telemetry/",)
    priorities: tuple[tuple[str, int], ...] = (("sys/", 100), ("telemetry/", -10))
    authority_key: bytes = b""
    kinds: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for prefix, kind in self.kinds:
            if not prefix or not kind:
                raise ValueError(f"a declared kind needs a prefix and a kind, got {(prefix, kind)!r}")
        if self.authority_key and len(self.authority_key) != 32:
            raise ValueError("authority_key must be a raw 32-byte ed25519 public key (or empty)")
        for template in self.node_zones:
            if "{node}" not in template or not template.endswith("/"):
                raise ValueError(f"node zone template {template!r} must contain {{node}} and end in '/'")
        heads = [t[: t.index("{node}")] for t in self.node_zones]
        for grant in self.grants:
            if grant.prefix.startswith(SYS_PREFIX) or SYS_PREFIX.startswith(grant.prefix):
                raise ValueError(f"bootstrap grant {grant.prefix!r} overlaps the authority's sys/")
            for head in heads:
                if head.startswith(grant.prefix) or grant.prefix.startswith(head):
                    raise ValueError(
                        f"bootstrap grant {grant.prefix!r} nests with the per-node zones {head}<node>/"
                    )

    @property
    def signed(self) -> bool:
        """True for a signed (secure) fleet: one with an :attr:`authority_key`."""
        return bool(self.authority_key)

    def keyring(self) -> KeyRing | None:
        """A fresh key ring knowing the authority key (None for an unsigned fleet)."""
        if not self.authority_key:
            return None
        return KeyRing(self.fleet_id, self.authority, self.authority_key)

    def bootstrap_digest(self) -> bytes:
        """A 16-byte digest of everything a replica's verdicts depend on at open.

        Covers the fleet id, the authority, the grants, the node zone
        templates, the telemetry prefixes and the priorities. Collections whose
        order carries no meaning (grants, owners, templates, prefixes,
        priorities: the highest match wins) are sorted first, so two equal
        bootstraps written in another order have the same digest. Peers compare
        it in ``Hello``: two nodes with different bootstraps judge the same op
        differently (one holds back what the other applies), so they refuse to
        sync rather than drift apart silently.

        Returns:
            The blake2b-128 digest.
        """
        grants = sorted((g.prefix, g.epoch, sorted(g.owners)) for g in self.grants)
        body: tuple[object, ...] = (
            1,  # layout version of this digest
            self.fleet_id,
            self.authority,
            grants,
            sorted(self.node_zones),
            sorted(self.telemetry),
            sorted(self.priorities),
        )
        if self.authority_key:  # unsigned fleets keep the digest they always had
            body = (*body, self.authority_key)
        if self.kinds:
            body = (*body, "kinds", sorted(self.kinds))
        return hashlib.blake2b(msgpack.packb(body, use_bin_type=True), digest_size=16).digest()


_STATIC_MEMO_KEYS = 8192
"""Keys whose static zone a :class:`ZoneTable` remembers (at about 200 bytes each)."""


class Verdict(enum.Enum):
    """What to do with a remote op, as far as zones are concerned."""

    ACCEPT = "accept"
    REJECT = "reject"
    WAIT = "wait"


@dataclass
class ZoneTable:
    """The grant history of one replica, and the write checks built on it."""

    fleet: Fleet
    _history: dict[str, dict[int, frozenset[str]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._add(Grant(SYS_PREFIX, frozenset({self.fleet.authority}), 0))
        for grant in self.fleet.grants:
            self._add(grant)
        self._static = frozenset(self._history)
        # Longest first: the first static prefix of the key found is the most specific.
        self._static_lens = tuple(sorted({len(p) for p in self._static}, reverse=True))
        self._templates = tuple(
            (t[: t.index("{node}")], t[t.index("{node}") + len("{node}") :])
            for t in self.fleet.node_zones
        )
        # Longest prefix first: the first match is the most specific declaration.
        self._kinds = tuple(sorted(self.fleet.kinds, key=lambda pk: -len(pk[0])))
        # key -> its static zone: they never change, and keys repeat (bounded: cleared when full)
        self._static_memo: dict[str, str | None] = {}

    def kind_of(self, key: str) -> str | None:
        """The kind the fleet bootstrap declares for ``key`` (None: undeclared)."""
        for prefix, kind in self._kinds:
            if key.startswith(prefix):
                return kind
        return None

    def check_kind(self, key: str, kind: str) -> None:
        """Refuse a local write of ``kind`` at ``key`` if the bootstrap declares another.

        Raises:
            OpError: naming the declared kind; nothing is written.
        """
        declared = self.kind_of(key) if self._kinds else None
        if declared is not None and kind != declared and kind not in _SYSTEM_KINDS:
            raise OpError(
                f"key {key!r} holds {declared} values (the fleet bootstrap declares it), "
                f"not {kind}; nothing was written"
            )

    def _static_zone(self, key: str) -> str | None:
        """The most specific zone known to every replica from the start that covers ``key``."""
        memo = self._static_memo
        try:
            return memo[key]
        except KeyError:
            pass
        if len(memo) >= _STATIC_MEMO_KEYS:
            memo.clear()
        best = memo[key] = self._find_static_zone(key)
        return best

    def _find_static_zone(self, key: str) -> str | None:
        best: str | None = None
        static = self._static
        for n in self._static_lens:
            if key[:n] in static:
                best = key[:n]
                break
        for head, tail in self._templates:
            if key.startswith(head):
                rest = key[len(head) :]
                cut = rest.find(tail) if tail else len(rest)
                if cut > 0:
                    zone = head + rest[:cut] + tail
                    if key.startswith(zone) and (best is None or len(zone) > len(best)):
                        best = zone
        return best

    def _add(self, grant: Grant) -> bool:
        epochs = self._history.setdefault(grant.prefix, {})
        if grant.epoch in epochs:
            return False
        epochs[grant.epoch] = grant.owners
        return True

    def copy(self) -> ZoneTable:
        """An independent copy (grants staged in a batch are discarded on rollback)."""
        clone = ZoneTable(self.fleet)
        clone._history = {p: dict(e) for p, e in self._history.items()}
        return clone

    def _nests(self, prefix: str) -> str | None:
        """An existing zone (or template) that ``prefix`` would nest with, if any."""
        for other in self._history:
            if other != prefix and (other.startswith(prefix) or prefix.startswith(other)):
                return other
        for head, tail in self._templates:
            if head.startswith(prefix) or prefix.startswith(head):
                return head + "{node}" + tail
        return None

    def check_grant(self, issuer: str, grant: Grant) -> str | None:
        """Why a grant op by ``issuer`` is invalid, or None if it may be applied.

        Only the authority grants; each grant of a prefix raises its epoch by
        exactly one, so every replica agrees on which epochs exist.
        """
        if issuer != self.fleet.authority:
            return f"only the fleet authority {self.fleet.authority!r} may grant zones"
        if grant.prefix.startswith(SYS_PREFIX) or SYS_PREFIX.startswith(grant.prefix):
            return "the sys/ zone belongs to the authority and cannot be granted"
        latest = self.latest(grant.prefix)
        if latest is None:
            nested = self._nests(grant.prefix)
            if nested is not None:
                return (
                    f"zone {grant.prefix!r} would nest with {nested!r}; zones nest only in "
                    "the fleet bootstrap"
                )
        expected = 1 if latest is None else latest.epoch + 1
        if grant.epoch != expected:
            return f"grant of {grant.prefix!r} at epoch {grant.epoch}, expected epoch {expected}"
        return None

    def add_grant(self, grant: Grant) -> bool:
        """Record a grant; False if ``(prefix, epoch)`` was already granted (first wins)."""
        return self._add(grant)

    def grants(self) -> Iterator[Grant]:
        """Every known grant (bootstrap and applied), by prefix then epoch."""
        for prefix in sorted(self._history):
            for epoch, owners in sorted(self._history[prefix].items()):
                yield Grant(prefix, owners, epoch)

    def latest(self, prefix: str) -> Grant | None:
        """The highest-epoch grant of ``prefix``, if any."""
        epochs = self._history.get(prefix)
        if not epochs:
            return None
        epoch = max(epochs)
        return Grant(prefix, epochs[epoch], epoch)

    def _node_zone(self, node_id: str, key: str) -> str | None:
        for head, tail in self._templates:
            if key.startswith(head):
                prefix = head + node_id + tail
                if key.startswith(prefix):
                    return prefix
        return None

    def zone_for_write(self, node_id: str, key: str) -> tuple[str, int]:
        """The ``(zone, epoch)`` a local write of ``key`` by ``node_id`` goes under.

        The most specific zone wins: a per-node zone, else the longest granted
        prefix of the key, at its latest epoch.

        Raises:
            ZoneOwnershipError: ``node_id`` does not own that zone now (or no
                zone covers the key).
        """
        own = self._node_zone(node_id, key)
        if own is not None:
            return own, 0
        best: Grant | None = None
        for prefix in self._history:
            if key.startswith(prefix) and (best is None or len(prefix) > len(best.prefix)):
                best = self.latest(prefix)
        if best is None:
            raise ZoneOwnershipError(f"no zone covers key {key!r}; node {node_id!r} cannot write it")
        if not best.allows(node_id):
            owners = ", ".join(sorted(best.owners))
            raise ZoneOwnershipError(
                f"key {key!r} is in zone {best.prefix!r} (epoch {best.epoch}) owned by "
                f"{owners}; node {node_id!r} cannot write it"
            )
        return best.prefix, best.epoch

    def judge(self, op: Op) -> tuple[Verdict, str]:
        """Decide whether a remote op's origin owned its zone at the op's epoch."""
        if not op.key.startswith(op.zone):
            return Verdict.REJECT, f"key {op.key!r} is outside the zone {op.zone!r} it names"
        static = self._static_zone(op.key)
        if static is not None and len(static) > len(op.zone):
            return (
                Verdict.REJECT,
                f"key {op.key!r} is in zone {static!r}, not the less specific {op.zone!r}",
            )
        if self._kinds and op.kind not in _SYSTEM_KINDS:
            declared = self.kind_of(op.key)
            if declared is not None and op.kind != declared:
                return (
                    Verdict.REJECT,
                    f"key {op.key!r} holds {declared} values (fleet bootstrap), not {op.kind}",
                )
        if op.epoch == 0 and self._node_zone(op.origin, op.key) == op.zone:
            if not is_node_id(op.origin):
                # "n1/x" would own fleet/n1/x/, inside n1's own zone.
                return Verdict.REJECT, f"origin {op.origin[:64]!r} is not a valid node id"
            return Verdict.ACCEPT, ""
        epochs = self._history.get(op.zone)
        if epochs is None or op.epoch not in epochs:
            if epochs is not None and op.epoch < max(epochs):
                return Verdict.REJECT, f"zone {op.zone!r} was never granted at epoch {op.epoch}"
            if op.epoch == 0:
                return Verdict.REJECT, f"zone {op.zone!r} has no epoch 0 (not a bootstrap zone)"
            return Verdict.WAIT, f"zone {op.zone!r} epoch {op.epoch} not known yet"
        owners = epochs[op.epoch]
        if ANYONE in owners or op.origin in owners:
            return Verdict.ACCEPT, ""
        return (
            Verdict.REJECT,
            f"origin {op.origin!r} did not own zone {op.zone!r} at epoch {op.epoch}",
        )

    @staticmethod
    def grant_key(prefix: str) -> str:
        """The ``sys/`` key a grant op for ``prefix`` is written under."""
        return GRANT_KEY_PREFIX + prefix


def grants_from(items: Iterable[tuple[str, Iterable[str], int]]) -> tuple[Grant, ...]:
    """Build grants from ``(prefix, owners, epoch)`` triples (config files, CLI)."""
    return tuple(Grant(p, frozenset(o), e) for p, o, e in items)
