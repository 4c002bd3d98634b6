"""Mesh tunables and their named presets."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace

from syncfw.sync.session import SessionConfig
from syncfw.transport.config import TransportConfig
from syncfw.transport.wire import MAX_FRAME_BYTES

__all__ = ["GossipBounds", "MeshConfig"]


@dataclass(frozen=True, slots=True)
class GossipBounds:
    """What a node takes from gossiped peer lists, and what it gossips itself.

    A peer list comes from a peer, so everything it can make this node hold,
    send or dial is capped here (see :mod:`syncfw.mesh.membership`).

    Attributes:
        max_members: the member table's size. When it is full, learned members
            never reached make room (the dead and the failed first); seeds and
            members reached before are never evicted; with nothing evictable a
            newcomer is refused.
        learn_per_frame: new members taken from one Peers frame at most.
        read_per_frame: entries of one Peers frame looked at at most (the rest
            are refused unread).
        gossip_members: members in this node's own Peers frame at most (itself
            aside), alive ones first, rotated so every member gets its turn.
        gossip_bytes: the most bytes this node's own Peers frame may take; kept
            well under the transport's frame cap.
        require_port: addresses must be ``host:port``; False lets a bare name
            through (the in-memory network names listeners without ports).
        allowed_networks: CIDR blocks a learned address must lie in (IP
            literals only: a hostname cannot be checked without resolving it);
            empty: any address.
        dials_per_s: new addresses (learned, never reached) dialed per second
            on average; seeds and members reached before are not counted.
        dial_burst: how many such dials may be saved up.
        warn_every_s: each kind of refusal is logged at most this often, with
            the count since the last line.
    """

    max_members: int = 1024
    learn_per_frame: int = 64
    read_per_frame: int = 1024
    gossip_members: int = 128
    gossip_bytes: int = 256 * 1024
    require_port: bool = True
    allowed_networks: tuple[str, ...] = ()
    dials_per_s: float = 1.0
    dial_burst: int = 8
    warn_every_s: float = 10.0

    def __post_init__(self) -> None:
        if min(self.max_members, self.learn_per_frame, self.read_per_frame) < 1:
            raise ValueError("max_members, learn_per_frame and read_per_frame must be >= 1")
        if self.gossip_members < 0 or not 1024 <= self.gossip_bytes <= MAX_FRAME_BYTES // 2:
            raise ValueError(
                f"gossip_members >= 0 and 1024 <= gossip_bytes <= {MAX_FRAME_BYTES // 2} are required"
            )
        if self.dials_per_s <= 0 or self.dial_burst < 1 or self.warn_every_s < 0:
            raise ValueError("dials_per_s > 0, dial_burst >= 1 and warn_every_s >= 0 are required")
        for net in self.allowed_networks:
            ipaddress.ip_network(net, strict=False)  # raises ValueError for a bad block

    def with_(self, **changes: object) -> GossipBounds:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """How often, with how many, and how much a node gossips; how fast it finds a peer gone.

    Failure detection is SWIM's (as memberlist does it): a failed contact
    (a dial past ``connect_timeout_s``, no Hello within ``probe_timeout_s``, a
    direct probe unanswered in ``probe_timeout_s``) is checked through
    ``indirect_probes`` other members, each asked to probe the peer; only when
    none of them reaches it either does it count as a failure. A peer is
    suspect after ``suspect_after`` such failures in a row and dead after
    ``dead_after_s`` suspect. Each round probes, beside its ``fanout``
    exchanges, one more member round-robin and every suspect one, so a peer
    killed is found dead within about ``interval_s + connect_timeout_s +
    probe_timeout_s + dead_after_s`` by every node that holds it.

    Attributes:
        interval_s: mean time between gossip rounds.
        jitter: each interval is drawn uniformly in ``interval_s * (1 ± jitter)``.
        fanout: live peers exchanged with per round.
        exchange_timeout_s: how long an exchange may go without progress (the
            runner's idle cut, stretched by the bytes in flight at the link's rate).
        max_exchange_s: the longest one exchange may run in all (its gRPC
            deadline), however it progresses.
        connect_timeout_s: how long dialing a peer may take (the mesh's bound,
            the transport's channel-ready wait and grpc's least connection
            attempt; see :meth:`transport`).
        probe_timeout_s: a direct probe's deadline, and how long a dialed
            peer has to send its Hello; an indirect probe gets twice that.
        indirect_probes: members asked to probe a peer this node failed to
            reach (memberlist's ping-req); 0 counts every failed contact at once.
        suspect_after: consecutive failed contacts (not vouched for by an
            indirect probe) before a peer is suspect.
        dead_after_s: time a peer stays suspect before it is declared dead.
        dead_retry_s: a dead peer is still tried this often (so a healed
            partition is noticed).
        reconnect_backoff_s: grpc's first reconnect backoff to a peer.
        max_reconnect_backoff_s: the cap on grpc's reconnect backoff, so a
            healed peer is reached again within about this long.
        peer_bytes_per_s: per-peer send budget (None: unlimited).
        peer_burst_bytes: how far the budget may be saved up.
        eager_push: exchange with connected peers as soon as a local write lands.
        push_debounce_s: local writes within this window share one push.
        push_fanout: most peers an eager push goes to (the most recently synced
            first); None pushes to every connected peer.
        gossip_peers_every: gossip the member list on every n-th exchange.
        clock_warn_ms: a peer clock further off than this is logged (a health signal).
        save_members_every_s: with a member file, how often the rounds save the
            member table (it is saved at a clean close too, so this bounds what
            a killed process forgets).
        session: sync session tunables (batch size, window, zstd).
        gossip: caps on what peer lists can make this node hold, send and dial.
    """

    interval_s: float = 1.0
    jitter: float = 0.25
    fanout: int = 3
    exchange_timeout_s: float = 30.0
    max_exchange_s: float = 600.0
    connect_timeout_s: float = 1.0
    probe_timeout_s: float = 0.5
    indirect_probes: int = 3
    suspect_after: int = 1
    dead_after_s: float = 2.0
    dead_retry_s: float = 2.0
    reconnect_backoff_s: float = 0.2
    max_reconnect_backoff_s: float = 1.0
    peer_bytes_per_s: float | None = None
    peer_burst_bytes: int = 4 * 1024 * 1024
    eager_push: bool = True
    push_debounce_s: float = 0.005
    push_fanout: int | None = None
    gossip_peers_every: int = 1
    clock_warn_ms: int = 500
    save_members_every_s: float = 10.0
    session: SessionConfig = field(default_factory=SessionConfig)
    gossip: GossipBounds = field(default_factory=GossipBounds)

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or not 0 <= self.jitter < 1 or self.fanout < 1:
            raise ValueError("interval_s > 0, 0 <= jitter < 1 and fanout >= 1 are required")
        if min(self.connect_timeout_s, self.probe_timeout_s, self.exchange_timeout_s) <= 0:
            raise ValueError(
                "connect_timeout_s, probe_timeout_s and exchange_timeout_s must be > 0"
            )
        if self.indirect_probes < 0 or self.suspect_after < 1:
            raise ValueError("indirect_probes >= 0 and suspect_after >= 1 are required")
        if self.dead_after_s < 0 or self.dead_retry_s < 0:
            raise ValueError("dead_after_s >= 0 and dead_retry_s >= 0 are required")
        if self.save_members_every_s <= 0:
            raise ValueError("save_members_every_s > 0 is required")
        if not 0 < self.reconnect_backoff_s <= self.max_reconnect_backoff_s:
            raise ValueError("0 < reconnect_backoff_s <= max_reconnect_backoff_s is required")

    def transport(self, base: TransportConfig | None = None) -> TransportConfig:
        """``base`` (the transport defaults if None) with this config's dial timings.

        The connect timeout and grpc's reconnect backoff come from here, so a
        preset's timings apply to the channels too; everything else (TLS,
        proxy, quotas) stays ``base``'s.
        """
        return replace(
            base or TransportConfig(),
            connect_timeout_s=self.connect_timeout_s,
            reconnect_backoff_s=self.reconnect_backoff_s,
            max_reconnect_backoff_s=self.max_reconnect_backoff_s,
            max_exchange_s=self.max_exchange_s,
        )

    @classmethod
    def lan(cls) -> MeshConfig:
        """A yard or depot LAN: rounds every second, fanout 3, no budget, dead in seconds.

        Timings: connect 1 s, probe 0.5 s, 3 indirect probes, suspect at the
        first unvouched failure, dead 2 s later; reconnect backoff 0.2 s up
        to 1 s. A killed peer is dead on every node within about 5 s.
        """
        return cls(
            interval_s=1.0,
            fanout=3,
            connect_timeout_s=1.0,
            probe_timeout_s=0.5,
            indirect_probes=3,
            suspect_after=1,
            dead_after_s=2.0,
            dead_retry_s=2.0,
            reconnect_backoff_s=0.2,
            max_reconnect_backoff_s=1.0,
        )

    @classmethod
    def metered_link(cls) -> MeshConfig:
        """Cellular or satellite: rare rounds, fanout 1, a tight per-peer budget, zstd.

        Timings: connect 15 s, probe 5 s (a 200 ms, lossy link), 2 indirect
        probes, suspect after 3 unvouched failures, dead 10 minutes later;
        reconnect backoff 1 s up to 30 s.
        """
        return cls(
            interval_s=30.0,
            jitter=0.5,
            fanout=1,
            exchange_timeout_s=120.0,
            connect_timeout_s=15.0,
            probe_timeout_s=5.0,
            indirect_probes=2,
            suspect_after=3,
            dead_after_s=600.0,
            dead_retry_s=120.0,
            reconnect_backoff_s=1.0,
            max_reconnect_backoff_s=30.0,
            peer_bytes_per_s=32 * 1024,
            peer_burst_bytes=256 * 1024,
            push_debounce_s=5.0,
            push_fanout=1,
            gossip_peers_every=10,
            session=SessionConfig(max_batch_bytes=256 * 1024, window=2, zstd=True),
            # gossip is rare and every byte is paid for: small lists, few new dials
            gossip=GossipBounds(
                max_members=256,
                learn_per_frame=16,
                gossip_members=32,
                gossip_bytes=32 * 1024,
                dials_per_s=0.05,
                dial_burst=2,
            ),
        )

    @classmethod
    def test(cls) -> MeshConfig:
        """Tests on one machine: fast rounds, fast failure detection.

        Timings: connect 1 s, probe 0.3 s, 2 indirect probes, suspect at the
        first unvouched failure, dead 0.5 s later; reconnect backoff 50 ms up
        to 0.5 s.
        """
        return cls(
            interval_s=0.05,
            jitter=0.2,
            fanout=2,
            exchange_timeout_s=5.0,
            connect_timeout_s=1.0,
            probe_timeout_s=0.3,
            indirect_probes=2,
            suspect_after=1,
            dead_after_s=0.5,
            dead_retry_s=0.2,
            reconnect_backoff_s=0.05,
            max_reconnect_backoff_s=0.5,
            push_debounce_s=0.01,
            # in-memory listeners are bare names; many nodes meet at once
            gossip=GossipBounds(require_port=False, dials_per_s=1000.0, dial_burst=64),
        )

    def with_(self, **changes: object) -> MeshConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]
