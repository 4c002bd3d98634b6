"""The one performer: carries out a sync session's effects against a replica.

A :class:`~syncfw.sync.Session` is sans-IO: it emits effects and waits for
answers. :class:`Performer` is the only code that turns those effects into
replica calls and link sends; the gRPC runner, the simulator and
:class:`~syncfw.exchange.pair.SessionPair` all drive one, so they share one
error policy. Invariants:

1. Effects are performed strictly in the order the session emitted them; the
   answer to an effect (``ops_fetched``, ``ops_applied``, ``apply_failed``,
   ``peer_ack_loaded``) is fed back at once and the effects it yields are
   performed before anything later, so every user feeds the session the same
   sequence of inputs.
2. One error policy. A replica error of syncfw's own tree
   (:class:`~syncfw.errors.SyncfwError`) ends the exchange with the status the
   session gives it (``DATA_LOSS`` for a forged or forked batch, ``INTERNAL``
   for storage); anything else is a bug: logged with its traceback and the
   exchange ends ``INTERNAL``. Reading the peer's ack record degrades to an
   empty record (summaries go whole); a failing peers callback is logged and
   ignored (membership bookkeeping never ends an exchange). A link that fails
   a send ends the exchange with the link's status.
3. Nothing raises out of :meth:`Performer.perform` but cancellation and
   ``BaseException``: every failure becomes the session's :class:`End`.
4. The code is ``async`` but imports no event loop: when the replica and the
   link never suspend, a performer is driven to completion by hand
   (:func:`~syncfw.exchange.pair.drive`), with no loop at all.
5. A :class:`~syncfw.sync.DecodeOps` (a large batch) is decoded where the
   ``offload`` hook says: inline by default (the pair and the simulator,
   deterministic), in a worker thread for the runner, so a large or hostile
   batch costs the event loop no long block. Decoding never touches the
   replica, so where it runs changes no outcome.
7. Snapshots (session invariant 11) follow the ack rule: a replica built
   with compaction (:class:`~syncfw.sync.snapshot.SnapshotReplica`) starts
   its sessions from its compaction points, and sends a snapshot to any peer
   below them; it takes one only from a peer it may take acks from (in a
   signed fleet, the authenticated peer). A refused or damaged snapshot ends
   the exchange with a clear status and changes nothing.
6. Acknowledgements drive compaction, so a peer's acknowledged vector is
   recorded only for the peer the link authenticated (:meth:`Performer.
   authenticate`: the node id of its mTLS certificate, bound to its Hello). In a
   signed fleet an ack from an unauthenticated peer is never recorded: it is
   counted (``syncfw_acks_ignored``) and warned about, rate-limited. An unsigned
   fleet (development) records every peer's ack, as it always did.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol, cast

from syncfw.codec import decode_batch
from syncfw.errors import ChainError, DecodeError, ForkError, SnapshotTooLargeError, SyncfwError
from syncfw.log import Op, Replica
from syncfw.metrics import NodeMetrics
from syncfw.notices import Notices, clip
from syncfw.sync import (
    Acknowledge,
    ApplyOps,
    DecodeOps,
    Effect,
    End,
    FetchOps,
    FetchSnapshot,
    Frame,
    InstallSnapshot,
    LearnPeers,
    LoadPeerAck,
    PeerInfo,
    Send,
    Session,
    Status,
    decode_snapshot,
    encode_snapshot,
)
from syncfw.sync.snapshot import Snapshot, SnapshotReplica
from syncfw.transport.base import LinkError

__all__ = ["Link", "Offload", "OnEnd", "OnPeers", "OnSendError", "Performer"]

log = logging.getLogger("syncfw.sync")

ACK_IGNORED_WARN_EVERY_S = 10.0
"""An ignored ack warns at most this often per peer id (the rest are counted)."""
_ack_notices = Notices(log, ACK_IGNORED_WARN_EVERY_S, max_keys=1024)

OnPeers = Callable[[tuple[PeerInfo, ...]], Awaitable[None] | None]
"""Called with each member list the peer gossips (may be async)."""
OnEnd = Callable[[Status, str], None]
"""Called once, when the session emits its :class:`End`."""
OnSendError = Callable[[LinkError], Coroutine[Any, Any, list[Effect]]]
"""Decides what a failed send means; returns the session's effects for it."""
Offload = Callable[[Callable[[], Any]], Awaitable[Any]]
"""Runs a pure decoding job elsewhere (a worker thread) and returns its result."""


class Link(Protocol):
    """Where a performer's frames go: the runner's stream, the simulator's scheduler, a pair's outbox."""

    async def send(self, frame: Frame) -> int:
        """Send one frame to the peer.

        Returns:
            The bytes it took on the wire (0 where the link does not encode).

        Raises:
            LinkError: the frame cannot go; the exchange ends with its status.
        """
        ...


def _log_unexpected(exc: BaseException, doing: str) -> None:
    """Replica errors of syncfw's own tree are expected; anything else is a bug worth a traceback."""
    if not isinstance(exc, SyncfwError):
        log.error("%s failed unexpectedly", doing, exc_info=exc)


def _named(below: Mapping[str, int]) -> str:
    shown = ", ".join(f"{clip(o)} up to {c}" for o, c in sorted(below.items())[:5])
    return shown + (f" and {len(below) - 5} more" if len(below) > 5 else "")


_SNAPSHOTS: dict[type, bool] = {}


def _snapshots(replica: object) -> SnapshotReplica | None:
    """``replica`` if it is a :class:`SnapshotReplica`, known per class (a protocol check
    walks every member of the protocol: tens of microseconds, once per exchange)."""
    kind = type(replica)
    known = _SNAPSHOTS.get(kind)
    if known is None:
        known = _SNAPSHOTS[kind] = isinstance(replica, SnapshotReplica)
    return cast(SnapshotReplica, replica) if known else None


class Performer:
    """Performs one session's effects against one replica over one link.

    Args:
        session: the session whose effects to perform (not started yet).
        replica: the local replica.
        link: where ``Send`` effects go.
        on_peers: called with each member list the peer gossips.
        on_end: called once when the session ends.
        on_send_error: what a failed send means (default: end the exchange
            with the link's status); the runner prefers the peer's own reason.
        offload: where large batches are decoded (default: inline).

    Attributes:
        frames_sent: frames the link accepted.
        bytes_sent: bytes the link reported for them.
        learned: member lists the peer gossiped, in order.
    """

    __slots__ = (
        "_handlers",
        "_identity",
        "_metrics",
        "_offload",
        "_on_end",
        "_on_peers",
        "_on_send_error",
        "bytes_sent",
        "frames_sent",
        "learned",
        "link",
        "replica",
        "session",
    )

    def __init__(
        self,
        session: Session,
        replica: Replica,
        link: Link,
        *,
        on_peers: OnPeers | None = None,
        on_end: OnEnd | None = None,
        on_send_error: OnSendError | None = None,
        offload: Offload | None = None,
    ) -> None:
        self.session = session
        self.replica = replica
        self.link = link
        self._on_peers = on_peers
        self._on_end = on_end
        self._on_send_error = on_send_error
        self._offload = offload
        self.frames_sent = 0
        self.bytes_sent = 0
        self.learned: list[tuple[PeerInfo, ...]] = []
        self._identity: str | None = None
        self._metrics: NodeMetrics | None = None
        # one dict lookup per effect instead of a chain of isinstance checks
        self._handlers: dict[type, Callable[[Any], Coroutine[Any, Any, list[Effect]]]] = {
            Send: self._send,
            FetchOps: self._fetch,
            DecodeOps: self._decode,
            ApplyOps: self._apply,
            Acknowledge: self._acknowledge,
            LoadPeerAck: self._load_peer_ack,
            LearnPeers: self._learn,
            FetchSnapshot: self._fetch_snapshot,
            InstallSnapshot: self._install_snapshot,
            End: self._end,
        }

    @property
    def ended(self) -> bool:
        """True once the session emitted :class:`End`."""
        return self.session.ended

    def authenticate(self, identity: str | None, metrics: NodeMetrics | None = None) -> None:
        """Name the peer the link authenticated (invariant 6) and the registry to count in.

        Args:
            identity: the node id the link proved (mTLS), or None: the link
                proved nothing, and in a signed fleet the peer's acks are ignored.
            metrics: the node's registry (``syncfw_acks_ignored``).
        """
        self._identity = identity
        self._metrics = metrics

    def _ack_trusted(self, peer: str) -> bool:
        """True if ``peer``'s ack may be recorded (invariant 6)."""
        if self._identity is not None:
            return self._identity == peer  # the session refused any other Hello already
        fleet = getattr(self.replica, "fleet", None)
        return not getattr(fleet, "signed", False)

    # -- inputs ------------------------------------------------------------------

    async def start(self) -> None:
        """Start the session from the replica's version vector.

        A replica that cannot read its vector ends the exchange ``INTERNAL``.
        """
        try:
            vv = await self.replica.version_vector()
            compacts = _snapshots(self.replica)
            floor = compacts.compacted() if compacts is not None else None
        except Exception as exc:
            _log_unexpected(exc, "reading the version vector")
            await self.perform(self.session.abort(Status.INTERNAL, f"could not read vector: {exc}"))
        else:
            await self.perform(self.session.start(vv, floor))

    async def receive(self, frame: Frame) -> None:
        """Feed a frame from the peer and perform what follows."""
        await self.perform(self.session.receive(frame))

    async def abort(self, status: Status, reason: str) -> None:
        """End the exchange from outside (cut, deadline, shutdown); tells the peer."""
        await self.perform(self.session.abort(status, reason))

    async def perform(self, effects: list[Effect]) -> None:
        """Perform ``effects`` in order, feeding each answer back (invariant 1)."""
        handlers = self._handlers
        pending = effects
        while pending:
            more: list[Effect] = []
            for i, effect in enumerate(pending):
                more = await handlers[type(effect)](effect)
                if more:
                    # answers come before the rest of this list (invariant 1)
                    more.extend(pending[i + 1 :])
                    break
            else:
                return
            pending = more

    # -- effects -------------------------------------------------------------------

    async def _send(self, effect: Send) -> list[Effect]:
        try:
            size = await self.link.send(effect.frame)
        except LinkError as exc:
            if self._on_send_error is not None:
                return await self._on_send_error(exc)
            return self.session.abort(exc.status, f"send failed: {exc.reason}")
        self.frames_sent += 1
        self.bytes_sent += size
        return []

    async def _fetch(self, effect: FetchOps) -> list[Effect]:
        try:
            ops = await self.replica.ops_since(
                effect.vv, limit=effect.limit, max_bytes=effect.max_bytes
            )
        except Exception as exc:
            _log_unexpected(exc, "reading ops")
            return self.session.abort(Status.INTERNAL, f"could not read ops: {exc}")
        return self.session.ops_fetched(ops)

    async def _decode(self, effect: DecodeOps) -> list[Effect]:
        def work() -> list[Op]:
            return decode_batch(effect.batch, limits=effect.limits, after=effect.after)

        try:
            if self._offload is not None:
                ops = await self._offload(work)
            else:
                ops = work()
        except (DecodeError, ChainError) as exc:
            return self.session.decode_failed(exc)
        except Exception as exc:  # a codec bug: say so, end the exchange, keep serving
            _log_unexpected(exc, "decoding a batch")
            return self.session.abort(Status.INTERNAL, f"could not decode a batch: {exc!r}")
        return self.session.ops_decoded(ops)

    async def _apply(self, effect: ApplyOps) -> list[Effect]:
        try:
            await self.replica.apply_remote(list(effect.ops))
            vv = await self.replica.version_vector()
        except Exception as exc:  # the session decides what each failure means
            _log_unexpected(exc, "applying a batch")
            return self.session.apply_failed(exc)
        return self.session.ops_applied(vv)

    async def _fetch_snapshot(self, effect: FetchSnapshot) -> list[Effect]:
        replica = _snapshots(self.replica)
        if replica is None:  # it sent a floor, so it compacts
            return self.session.snapshot_unavailable("this replica builds no snapshots")
        peer = clip(self.session.peer_id or "?")
        try:
            snap = await replica.snapshot(max_bytes=self.session.config.max_snapshot_bytes)
            data = await self._cpu(lambda: encode_snapshot(snap))
        except SnapshotTooLargeError as exc:
            log.warning(
                "%s: peer %s lacks ops compacted here (%s) and needs a snapshot, but %s",
                self.replica.node_id,
                peer,
                _named(effect.below),
                exc,
            )
            if self._metrics is not None:
                self._metrics.snapshots.labels(self._metrics.node_id, "too_large").inc()
            return self.session.snapshot_unavailable(str(exc))
        except Exception as exc:
            _log_unexpected(exc, "building a snapshot")
            return self.session.snapshot_unavailable(f"could not build one: {exc}")
        log.warning(
            "%s: peer %s lacks ops compacted here (%s); sending a state snapshot of %d "
            "states (%d bytes) standing for %d origins",
            self.replica.node_id,
            peer,
            _named(effect.below),
            len(snap.states),
            len(data),
            len(snap.vv),
        )
        if self._metrics is not None:
            self._metrics.snapshots.labels(self._metrics.node_id, "sent").inc()
        return self.session.snapshot_fetched(data, snap.vv)

    async def _install_snapshot(self, effect: InstallSnapshot) -> list[Effect]:
        replica, peer = _snapshots(self.replica), self.session.peer_id or ""
        if replica is None:
            return self.session.snapshot_failed(
                Status.FAILED_PRECONDITION, "this replica takes no snapshots"
            )
        if not self._ack_trusted(peer):
            return self.session.snapshot_failed(
                Status.PERMISSION_DENIED,
                "the peer is not authenticated, and in a signed fleet a snapshot (a claim "
                "of the peer that sends it) is taken only from an authenticated peer",
            )
        cap = self.session.config.max_snapshot_bytes
        try:
            snap: Snapshot = await self._cpu(lambda: decode_snapshot(effect.data, max_bytes=cap))
            await replica.install_snapshot(snap, source=peer)
            vv = await self.replica.version_vector()
        except DecodeError as exc:
            return self.session.snapshot_failed(Status.INVALID_ARGUMENT, str(exc))
        except (ChainError, ForkError) as exc:
            return self.session.snapshot_failed(Status.DATA_LOSS, str(exc))
        except Exception as exc:
            _log_unexpected(exc, "installing a snapshot")
            return self.session.snapshot_failed(Status.INTERNAL, f"could not install it: {exc}")
        log.warning(
            "%s: installed a state snapshot from %s (%d states, %d bytes): it stands for "
            "%d origins, the ops before it are not held here",
            self.replica.node_id,
            clip(peer),
            len(snap.states),
            len(effect.data),
            len(snap.vv),
        )
        if self._metrics is not None:
            self._metrics.snapshots.labels(self._metrics.node_id, "installed").inc()
        return self.session.snapshot_installed(vv)

    async def _cpu(self, job: Callable[[], Any]) -> Any:
        """Pure CPU work, where ``offload`` says (invariant 5)."""
        return await self._offload(job) if self._offload is not None else job()

    async def _acknowledge(self, effect: Acknowledge) -> list[Effect]:
        if not self._ack_trusted(effect.peer):
            if self._metrics is not None:
                self._metrics.acks_ignored.labels(self._metrics.node_id).inc()
            _ack_notices.warn(
                f"{self.replica.node_id}|{clip(effect.peer)}",
                1,
                "%s: ignored the ack of %s: the peer is not authenticated (no mTLS certificate "
                "bound to its Hello), and in a signed fleet only authenticated acks drive "
                "compaction",
                self.replica.node_id,
                clip(effect.peer),
            )
            return []
        try:
            await self.replica.acknowledge(effect.peer, effect.vv)
        except Exception as exc:
            _log_unexpected(exc, "recording an ack")
            return self.session.abort(Status.INTERNAL, f"could not record ack: {exc}")
        return []

    async def _load_peer_ack(self, effect: LoadPeerAck) -> list[Effect]:
        try:
            record = await self.replica.peer_ack(effect.peer)
        except Exception as exc:  # without the record, summaries go whole
            if isinstance(exc, SyncfwError):
                log.warning("no ack record of %s (%s); summaries go whole", effect.peer, exc)
            else:
                _log_unexpected(exc, "reading a peer's ack")
            record = {}
        return self.session.peer_ack_loaded(record)

    async def _learn(self, effect: LearnPeers) -> list[Effect]:
        self.learned.append(effect.peers)
        if self._on_peers is not None:
            try:
                res = self._on_peers(effect.peers)
                if inspect.isawaitable(res):
                    await res
            except Exception:  # membership bookkeeping must not end the exchange
                log.exception("handling peers gossiped by %s failed", self.session.peer_id)
        return []

    async def _end(self, effect: End) -> list[Effect]:
        if self._on_end is not None:
            self._on_end(effect.status, effect.reason)
        return []
