"""Tunables of the gRPC transport: TLS material, limits, and the grpc options they become.

Invariants:

1. Every limit the server enforces on what a peer opens is here, with a
   default that keeps a node serving honest peers while one peer misbehaves:
   per-connection, per-peer and per-identity quotas well below the global cap,
   a deadline for the first frame, and connection idle and age limits that
   end what a stalled peer left behind.
2. grpc option names appear here only (:meth:`TransportConfig.channel_options`,
   :meth:`TransportConfig.server_options`); nothing else spells them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncfw.transport.admission import Quotas
from syncfw.transport.front import FrontLimits
from syncfw.transport.wire import MAX_FRAME_BYTES

__all__ = ["TlsConfig", "TransportConfig"]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Mutual TLS: this node's certificate and the fleet's CA.

    A node's certificate carries its node id as the subject common name; the
    server refuses a peer whose ``Hello`` names another node than its
    certificate does.

    Attributes:
        ca_pem: the fleet CA certificate(s), PEM.
        cert_pem: this node's certificate chain, PEM.
        key_pem: this node's private key, PEM.
        server_name: the name peers' certificates are checked against when
            dialing (their SAN); None checks the dialed host.
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    server_name: str | None = None

    @classmethod
    def from_files(
        cls, ca: str | Path, cert: str | Path, key: str | Path, *, server_name: str | None = None
    ) -> TlsConfig:
        """Read the three PEM files."""
        return cls(
            Path(ca).read_bytes(), Path(cert).read_bytes(), Path(key).read_bytes(), server_name
        )


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Tunables of the gRPC transport (presets: the defaults, :meth:`test`).

    Attributes:
        max_message_bytes: largest frame either way (gRPC max message size).
        keepalive_s: interval of HTTP/2 keepalive pings on idle connections.
        keepalive_timeout_s: a ping unanswered this long closes the connection.
        connect_timeout_s: how long to wait for a channel to become ready; also
            the least time grpc gives one connection attempt
            (``grpc.min_reconnect_backoff_ms``).
        reconnect_backoff_s: grpc's first reconnect backoff after a failed
            connection attempt (``grpc.initial_reconnect_backoff_ms``).
        max_reconnect_backoff_s: the cap on grpc's growing reconnect backoff
            (``grpc.max_reconnect_backoff_ms``; grpc's own default is 120 s,
            which keeps a healed peer unreached for minutes).
        exchange_timeout_s: how long an exchange call may go without progress
            (no message read, no write completed); on the server, a call idle
            this long (plus a second for the handler's own deadline to speak
            first) is cut, even when a write is blocked on flow control.
        max_exchange_s: the longest an exchange call may run in all, however it
            progresses (the dialer's gRPC deadline; the server cuts it too): a
            thin link's long catch-up runs on up to it.
        max_concurrent_exchanges: exchanges the server serves at once.
        max_exchanges_per_peer: of those, at most this many from one peer
            address (host); beyond it ``RESOURCE_EXHAUSTED`` at once.
        max_exchanges_per_identity: at most this many from one node id
            authenticated by mTLS.
        max_exchanges_per_connection: at most this many on one HTTP/2
            connection (our quota; grpc's stream limit is the next one).
        max_streams_per_connection: HTTP/2 ``SETTINGS_MAX_CONCURRENT_STREAMS``
            the server advertises (exchanges and health checks together).
        hello_timeout_s: a stream that sends no first frame (its ``Hello``)
            this long after opening is ended ``DEADLINE_EXCEEDED``.
        max_connection_idle_s: a server connection with no call this long is
            closed (GOAWAY).
        max_connection_age_s: any server connection is asked to go away
            (GOAWAY) this long after it opened; the client reconnects.
        max_connection_age_grace_s: after that GOAWAY, calls still running get
            this long, then the connection is closed and every call on it
            freed (the only way grpc frees a call whose write is blocked).
        max_pings_without_data: keepalive pings a client sends with no data
            between (0: unlimited, which idle keepalive needs).
        max_ping_strikes: pings a server tolerates that come faster than
            ``keepalive_s / 2`` before closing the connection (ping floods).
        refusal_log_interval_s: at most one WARNING per peer host and reason
            this often; the next line counts what was held back.
        refusal_hold_s: a refusal the peer brought on itself (over its quota,
            out of CPU budget) is answered this long after the call came, so a
            peer retrying at once meets about its stream limit of refusals per
            ``refusal_hold_s`` per connection; 0 answers at once (admission,
            invariant 2).
        max_held_refusals_per_host: refusals held so at once for one host;
            beyond it they are answered at once.
        max_held_refusals: refusals held at once, all hosts together.
        front_door: serve through the front door (:mod:`syncfw.transport.front`),
            which reads each source host no faster than ``inbound_rate``; off
            only where something in front of the node limits each source.
        inbound_rate: bytes a second the front door reads from one host, all
            its connections together (32 MiB/s: far above what sync and
            artifact pushes need, far below what grpc can be made to read).
        inbound_burst: bytes a host may send at once before ``inbound_rate``
            applies.
        max_connections_per_host: connections at once from one host; more are
            closed at once.
        max_connections: connections at once, all hosts together.
        http_proxy: dial peers through this HTTP CONNECT proxy (``http://host:port``).
        tls: mutual TLS; None serves and dials in plaintext (loopback, tests).
    """

    max_message_bytes: int = MAX_FRAME_BYTES
    keepalive_s: float = 20.0
    keepalive_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    reconnect_backoff_s: float = 1.0
    max_reconnect_backoff_s: float = 5.0
    exchange_timeout_s: float = 60.0
    max_exchange_s: float = 600.0
    max_concurrent_exchanges: int = 64
    max_exchanges_per_peer: int = 8
    max_exchanges_per_identity: int = 8
    max_exchanges_per_connection: int = 8
    max_streams_per_connection: int = 16
    hello_timeout_s: float = 5.0
    max_connection_idle_s: float = 300.0
    max_connection_age_s: float = 600.0
    max_connection_age_grace_s: float = 70.0
    max_pings_without_data: int = 0
    max_ping_strikes: int = 2
    refusal_log_interval_s: float = 10.0
    refusal_hold_s: float = 1.0
    max_held_refusals_per_host: int = 16
    max_held_refusals: int = 256
    front_door: bool = True
    inbound_rate: int = 32 << 20
    inbound_burst: int = 8 << 20
    max_connections_per_host: int = 32
    max_connections: int = 1024
    http_proxy: str | None = None
    tls: TlsConfig | None = None

    def __post_init__(self) -> None:
        if not 0 < self.reconnect_backoff_s <= self.max_reconnect_backoff_s:
            raise ValueError("0 < reconnect_backoff_s <= max_reconnect_backoff_s is required")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s > 0 is required")

    @classmethod
    def test(cls, **changes: Any) -> TransportConfig:
        """Short deadlines and limits for tests and benchmarks on loopback."""
        base = cls(
            connect_timeout_s=2.0,
            exchange_timeout_s=5.0,
            hello_timeout_s=1.0,
            max_connection_age_s=10.0,
            max_connection_age_grace_s=6.0,
            refusal_log_interval_s=1.0,
        )
        return dataclasses.replace(base, **changes)

    def quotas(self) -> Quotas:
        """The admission limits of the server."""
        return Quotas(
            max_concurrent_exchanges=self.max_concurrent_exchanges,
            per_peer=self.max_exchanges_per_peer,
            per_identity=self.max_exchanges_per_identity,
            per_connection=self.max_exchanges_per_connection,
            stall_hold_s=self.max_connection_age_s + self.max_connection_age_grace_s,
            refusal_hold_s=self.refusal_hold_s,
            held_per_peer=self.max_held_refusals_per_host,
            max_held=self.max_held_refusals,
        )

    def front_limits(self) -> FrontLimits:
        """What the front door allows each source host."""
        return FrontLimits(
            rate=self.inbound_rate,
            burst=self.inbound_burst,
            per_source=self.max_connections_per_host,
            max_connections=self.max_connections,
            log_interval_s=self.refusal_log_interval_s,
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """grpc channel arguments for these settings (client and server alike)."""
        return (
            [
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", self.max_pings_without_data),
                ("grpc.http2.min_ping_interval_without_data_ms", int(self.keepalive_s * 500)),
                ("grpc.enable_retries", 0),
                ("grpc.initial_reconnect_backoff_ms", _ms(self.reconnect_backoff_s)),
                ("grpc.max_reconnect_backoff_ms", _ms(self.max_reconnect_backoff_s)),
                ("grpc.min_reconnect_backoff_ms", _ms(self.connect_timeout_s)),
                ("grpc.so_reuseport", 0),
            ]
            + ([("grpc.http_proxy", self.http_proxy)] if self.http_proxy else [])
            + (
                [("grpc.ssl_target_name_override", self.tls.server_name)]
                if self.tls is not None and self.tls.server_name
                else []
            )
        )

    def server_options(self) -> list[tuple[str, Any]]:
        """grpc server arguments: the channel ones plus connection and stream limits."""
        return [
            *self.channel_options(),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.max_connection_idle_ms", int(self.max_connection_idle_s * 1000)),
            ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace_s * 1000)),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.keepalive_s * 500)),
        ]


def _ms(seconds: float) -> int:
    """A grpc millisecond option (at least 1 ms)."""
    return max(1, int(seconds * 1000))
