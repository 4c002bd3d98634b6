"""Mesh tunables and their named presets."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from syncfw.sync.session import SessionConfig

__all__ = ["MeshConfig"]


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """How often, with how many, and how much a node gossips.

    Attributes:
        interval_s: mean time between gossip rounds.
        jitter: each interval is drawn uniformly in ``interval_s * (1 ± jitter)``.
        fanout: live peers exchanged with per round.
        exchange_timeout_s: deadline of one exchange.
        connect_timeout_s: how long dialing a peer may take.
        suspect_after: consecutive failed exchanges before a peer is suspect.
        dead_after_s: time a peer stays suspect before it is declared dead.
        dead_retry_s: a dead peer is still tried this often (so a healed
            partition is noticed).
        peer_bytes_per_s: per-peer send budget (None: unlimited).
        peer_burst_bytes: how far the budget may be saved up.
        eager_push: exchange with connected peers as soon as a local write lands.
        push_debounce_s: local writes within this window share one push.
        push_fanout: most peers an eager push goes to (the most recently synced
            first); None pushes to every connected peer.
        gossip_peers_every: gossip the member list on every n-th exchange.
        clock_warn_ms: a peer clock further off than this is logged (a health signal).
        session: sync session tunables (batch size, window, zstd).
    """

    interval_s: float = 1.0
    jitter: float = 0.25
    fanout: int = 3
    exchange_timeout_s: float = 30.0
    connect_timeout_s: float = 3.0
    suspect_after: int = 2
    dead_after_s: float = 10.0
    dead_retry_s: float = 5.0
    peer_bytes_per_s: float | None = None
    peer_burst_bytes: int = 4 * 1024 * 1024
    eager_push: bool = True
    push_debounce_s: float = 0.005
    push_fanout: int | None = None
    gossip_peers_every: int = 1
    clock_warn_ms: int = 500
    session: SessionConfig = field(default_factory=SessionConfig)

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or not 0 <= self.jitter < 1 or self.fanout < 1:
            raise ValueError("interval_s > 0, 0 <= jitter < 1 and fanout >= 1 are required")

    @classmethod
    def lan(cls) -> MeshConfig:
        """A yard or depot LAN: frequent rounds, wide fanout, no budget."""
        return cls(interval_s=1.0, fanout=3, dead_after_s=10.0)

    @classmethod
    def metered_link(cls) -> MeshConfig:
        """Cellular or satellite: rare rounds, fanout 1, a tight per-peer budget, zstd."""
        return cls(
            interval_s=30.0,
            jitter=0.5,
            fanout=1,
            exchange_timeout_s=120.0,
            connect_timeout_s=15.0,
            suspect_after=3,
            dead_after_s=600.0,
            dead_retry_s=120.0,
            peer_bytes_per_s=32 * 1024,
            peer_burst_bytes=256 * 1024,
            push_debounce_s=5.0,
            push_fanout=1,
            gossip_peers_every=10,
            session=SessionConfig(max_batch_bytes=256 * 1024, window=2, zstd=True),
        )

    @classmethod
    def test(cls) -> MeshConfig:
        """Tests on one machine: fast rounds, fast failure detection."""
        return cls(
            interval_s=0.05,
            jitter=0.2,
            fanout=2,
            exchange_timeout_s=5.0,
            connect_timeout_s=1.0,
            suspect_after=1,
            dead_after_s=0.5,
            dead_retry_s=0.2,
            push_debounce_s=0.01,
        )

    def with_(self, **changes: object) -> MeshConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]
