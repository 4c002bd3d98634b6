"""The gRPC transport: a grpc.aio server, pooled client channels, the health service.

Invariants:

1. grpc is imported here and nowhere else in syncfw; every grpc exception is
   translated into :class:`LinkError` (with the :class:`Status` of the same
   number) before it leaves this module.
2. Protocol logic stays in :mod:`syncfw.sync` and frame encoding in the
   exchange runner: the servicer only adapts a call to a byte
   :class:`FrameStream` and hands it to the exchange handler. The ``Exchange``
   method carries opaque bytes (identity serializers); they are the protobuf
   ``Frame`` of ``protos/syncfw/v1/sync.proto``, so any gRPC client that speaks
   the ``.proto`` interoperates.
3. Every call has a deadline, every channel has keepalive and a max message
   size, and the server caps concurrent exchanges (``RESOURCE_EXHAUSTED``
   beyond it); grpc's HTTP/2 flow control is the backpressure under the
   session's window.
4. A non-OK end of an exchange on the server becomes the call's gRPC status
   (code and details), so any gRPC client sees a clear status too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from syncfw.sync.frames import Status
from syncfw.transport._pb import health_pb2, health_pb2_grpc
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.wire import MAX_FRAME_BYTES

__all__ = [
    "ChannelPool",
    "GrpcServer",
    "GrpcStream",
    "TlsConfig",
    "TransportConfig",
    "check_health",
]

log = logging.getLogger("syncfw.transport")

SERVICE = "syncfw.v1.Sync"
EXCHANGE = "/syncfw.v1.Sync/Exchange"
# Frames cross gRPC as the bytes wire.encode_frame makes (identity
# serializers), so every transport carries the very same bytes and a
# malformed frame surfaces in the exchange runner, as DecodeError, not in grpc.
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


def _same_bytes(data: bytes) -> bytes:
    """The identity (de)serializer: the Exchange method carries opaque bytes."""
    return data


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
    """Tunables of the gRPC transport.

    Attributes:
        max_message_bytes: largest frame either way (gRPC max message size).
        keepalive_s: interval of HTTP/2 keepalive pings on idle connections.
        keepalive_timeout_s: a ping unanswered this long closes the connection.
        connect_timeout_s: how long to wait for a channel to become ready.
        exchange_timeout_s: deadline of one exchange call.
        max_concurrent_exchanges: exchanges the server serves at once.
        http_proxy: dial peers through this HTTP CONNECT proxy (``http://host:port``).
        tls: mutual TLS; None serves and dials in plaintext (loopback, tests).
    """

    max_message_bytes: int = MAX_FRAME_BYTES
    keepalive_s: float = 20.0
    keepalive_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    exchange_timeout_s: float = 60.0
    max_concurrent_exchanges: int = 64
    http_proxy: str | None = None
    tls: TlsConfig | None = None

    def channel_options(self) -> list[tuple[str, Any]]:
        """grpc channel arguments for these settings."""
        return (
            [
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.http2.min_ping_interval_without_data_ms", int(self.keepalive_s * 500)),
                ("grpc.enable_retries", 0),
                ("grpc.so_reuseport", 0),
            ]
            + ([("grpc.http_proxy", self.http_proxy)] if self.http_proxy else [])
            + (
                [("grpc.ssl_target_name_override", self.tls.server_name)]
                if self.tls is not None and self.tls.server_name
                else []
            )
        )


def _status_of(code: grpc.StatusCode | None) -> Status:
    if code is None:
        return Status.UNAVAILABLE
    try:
        return Status(code.value[0])
    except ValueError:
        return Status.INTERNAL


def _translate(exc: BaseException) -> LinkError:
    if isinstance(exc, grpc.aio.AioRpcError):
        details = exc.details() or exc.code().name
        return LinkError(_status_of(exc.code()), details)
    return LinkError(Status.ABORTED, f"link failed: {exc!r}")


class GrpcStream:
    """A :class:`FrameStream` over one gRPC ``Exchange`` call, either side."""

    def __init__(
        self,
        *,
        call: grpc.aio.StreamStreamCall[bytes, bytes] | None = None,
        context: grpc.aio.ServicerContext[bytes, bytes] | None = None,
        peer_address: str = "",
        peer_identity: str | None = None,
    ) -> None:
        if (call is None) == (context is None):
            raise ValueError("a GrpcStream wraps a client call or a server context")
        self._call = call
        self._ctx = context
        self._peer = peer_address
        self.peer_identity = peer_identity
        self._closed = False
        self.end_status: Status | None = None
        self.end_reason = ""

    @property
    def peer_address(self) -> str:
        """The other end, as gRPC names it."""
        return self._peer

    async def send(self, data: bytes) -> None:
        """Write one message; awaits HTTP/2 flow control.

        Raises:
            LinkError: the call ended (with the peer's status, if it set one).
        """
        msg = data
        try:
            if self._call is not None:
                await self._call.write(msg)
            else:
                assert self._ctx is not None
                await self._ctx.write(msg)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            raise await self._ended_with(_translate(exc)) from None
        except (grpc.RpcError, grpc.aio.BaseError) as exc:  # e.g. the call ended under us
            raise await self._ended_with(
                LinkError(Status.ABORTED, f"write failed: {exc!r}")
            ) from None

    async def _ended_with(self, fallback: LinkError) -> LinkError:
        """The status the peer ended the call with, if it did (a write raced its end)."""
        if self._call is not None and self._call.done():
            with contextlib.suppress(Exception):
                code = await self._call.code()
                if code is not grpc.StatusCode.OK and code is not grpc.StatusCode.CANCELLED:
                    return LinkError(_status_of(code), await self._call.details() or code.name)
        return fallback

    async def recv(self) -> bytes | None:
        """Read one message; None when the peer finished with OK.

        Raises:
            LinkError: the call failed or ended with a non-OK status.
        """
        try:
            if self._call is not None:
                msg = await self._call.read()
                if msg is _EOF:
                    code = await self._call.code()
                    if code is grpc.StatusCode.OK:
                        return None
                    raise LinkError(_status_of(code), await self._call.details() or code.name)
            else:
                assert self._ctx is not None
                msg = await self._ctx.read()
                if msg is _EOF:
                    return None
        except LinkError:
            raise
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            raise _translate(exc) from None
        except grpc.RpcError as exc:  # pragma: no cover
            raise LinkError(Status.ABORTED, f"read failed: {exc!r}") from None
        if not isinstance(msg, bytes):  # pragma: no cover  # identity deserializer
            raise LinkError(Status.INTERNAL, f"a message arrived as {type(msg).__name__}")
        return msg

    async def close(self, status: Status, reason: str) -> None:
        """Client: half-close (OK) or cancel the call. Server: set the call's status."""
        if self._closed:
            return
        self._closed = True
        self.end_status, self.end_reason = status, reason
        if self._call is not None:
            if status is Status.OK:
                with contextlib.suppress(Exception):
                    await self._call.done_writing()
            else:
                self._call.cancel()
        elif self._ctx is not None and status is not Status.OK:
            self._ctx.set_code(grpc.StatusCode[status.name])
            self._ctx.set_details(reason[:1000])


ExchangeHandler = Callable[[FrameStream], Awaitable[object]]


def _identity(context: grpc.aio.ServicerContext[bytes, bytes]) -> str | None:
    """The node id in the peer's TLS certificate (subject CN), if the call is mTLS."""
    auth = context.auth_context()
    names = list(auth.get("x509_common_name") or [])
    return names[0].decode("utf-8", "replace") if names else None


class _SyncServicer:
    def __init__(self, handler: ExchangeHandler) -> None:
        self._handler = handler

    def generic_handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        """``syncfw.v1.Sync`` with raw-bytes frames."""
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Exchange": grpc.stream_stream_rpc_method_handler(
                    self.Exchange,
                    request_deserializer=_same_bytes,
                    response_serializer=_same_bytes,
                )
            },
        )

    async def Exchange(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> None:
        stream = GrpcStream(
            context=context, peer_address=context.peer(), peer_identity=_identity(context)
        )
        try:
            await self._handler(stream)
        except Exception:  # never let a handler bug leak a grpc traceback to the peer
            log.exception("exchange handler failed for %s", context.peer())
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details("internal error")


class _HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.statuses: dict[str, int] = {
            "": health_pb2.HealthCheckResponse.SERVING,
            SERVICE: health_pb2.HealthCheckResponse.SERVING,
        }
        self.changed = asyncio.Event()

    def set(self, status: int) -> None:
        for name in self.statuses:
            self.statuses[name] = status
        self.changed.set()
        self.changed = asyncio.Event()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self.statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                k: health_pb2.HealthCheckResponse(status=v)  # type: ignore[arg-type]
                for k, v in self.statuses.items()
            }
        )

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self.statuses.get(
                request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            )
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]
                last = status
            await self.changed.wait()


class GrpcServer:
    """A running grpc.aio server for ``syncfw.v1.Sync`` and ``grpc.health.v1.Health``.

    Start with :meth:`start`; stop with :meth:`aclose`.
    """

    def __init__(
        self, server: grpc.aio.Server, port: int, host: str, health: _HealthServicer
    ) -> None:
        self._server = server
        self.port = port
        self.host = host
        self._health = health

    @property
    def address(self) -> str:
        """``host:port`` the server listens on."""
        return f"{self.host}:{self.port}"

    @classmethod
    async def start(
        cls,
        listen: str,
        handler: ExchangeHandler,
        *,
        config: TransportConfig | None = None,
    ) -> GrpcServer:
        """Listen on ``listen`` (``host:port``; port 0 picks a free one).

        With ``config.tls`` the server requires client certificates from the
        fleet CA (mutual TLS) and binds each exchange to the certificate's node id.

        Args:
            listen: address to bind.
            handler: runs one exchange on each incoming stream.
            config: transport tunables.

        Raises:
            LinkError: ``UNAVAILABLE``: the address cannot be bound.
        """
        cfg = config or TransportConfig()
        server = grpc.aio.server(
            options=cfg.channel_options(),
            maximum_concurrent_rpcs=cfg.max_concurrent_exchanges,
        )
        server.add_generic_rpc_handlers((_SyncServicer(handler).generic_handler(),))
        health = _HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)  # type: ignore[no-untyped-call]
        host = listen.rsplit(":", 1)[0] or "127.0.0.1"
        try:
            if cfg.tls is None:
                port = server.add_insecure_port(listen)
            else:
                creds = grpc.ssl_server_credentials(
                    [(cfg.tls.key_pem, cfg.tls.cert_pem)],
                    root_certificates=cfg.tls.ca_pem,
                    require_client_auth=True,
                )
                port = server.add_secure_port(listen, creds)
        except RuntimeError as exc:
            raise LinkError(Status.UNAVAILABLE, f"cannot listen on {listen}: {exc}") from None
        if port == 0:
            raise LinkError(Status.UNAVAILABLE, f"cannot listen on {listen}")
        await server.start()
        return cls(server, port, host, health)

    async def aclose(self, grace_s: float = 1.0) -> None:
        """Report NOT_SERVING, let running exchanges finish for ``grace_s``, stop."""
        self._health.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(grace_s)


class ChannelPool:
    """One gRPC channel per peer address, reused across exchanges.

    Args:
        config: transport tunables (keepalive, deadlines, message size).
    """

    def __init__(self, config: TransportConfig | None = None) -> None:
        self.config = config or TransportConfig()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        """The pooled channel to ``address`` (created on first use)."""
        ch = self._channels.get(address)
        if ch is None:
            tls = self.config.tls
            if tls is None:
                ch = grpc.aio.insecure_channel(address, options=self.config.channel_options())
            else:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=tls.ca_pem,
                    private_key=tls.key_pem,
                    certificate_chain=tls.cert_pem,
                )
                ch = grpc.aio.secure_channel(address, creds, options=self.config.channel_options())
            self._channels[address] = ch
        return ch

    async def open(self, address: str, *, timeout_s: float | None = None) -> GrpcStream:
        """Open an ``Exchange`` call to ``address``.

        Args:
            address: ``host:port`` of the peer.
            timeout_s: the call's deadline (default: ``exchange_timeout_s``).

        Raises:
            LinkError: ``UNAVAILABLE`` if the peer cannot be reached in
                ``connect_timeout_s``.
        """
        ch = self.channel(address)
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await ch.channel_ready()
        except TimeoutError:
            raise LinkError(Status.UNAVAILABLE, f"{address} unreachable") from None
        except grpc.RpcError as exc:  # pragma: no cover
            raise LinkError(Status.UNAVAILABLE, f"{address}: {exc!r}") from None
        method: Any = ch.stream_stream(  # bytes in, bytes out
            EXCHANGE, request_serializer=_same_bytes, response_deserializer=_same_bytes
        )
        call = method(
            timeout=timeout_s if timeout_s is not None else self.config.exchange_timeout_s
        )
        return GrpcStream(call=call, peer_address=address)

    async def drop(self, address: str) -> None:
        """Close the channel to ``address`` (a dead peer)."""
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close(None)

    async def aclose(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close(None)


async def check_health(address: str, *, service: str = "", timeout_s: float = 2.0) -> bool:
    """True if ``address`` answers the gRPC health check with SERVING."""
    try:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)  # type: ignore[no-untyped-call]
            resp = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except (TimeoutError, grpc.RpcError):
        return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
