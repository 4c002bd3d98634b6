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
   size. The server admits a call against quotas per connection, peer
   address, identity and overall (:mod:`~syncfw.transport.admission`;
   ``RESOURCE_EXHAUSTED`` beyond one: at once for the global cap, after a
   bounded hold for the peer's own quotas and CPU budget, so reopening
   refused calls cannot buy a refusal per round trip), ends a call whose first frame
   does not come within ``hello_timeout_s``, and cuts every call at
   ``exchange_timeout_s``: a call whose write is blocked on flow control is
   abandoned without waiting for the write (its slot is reclaimed at once, its
   peer's quota when the connection's age limit has freed it in grpc).
   grpc's HTTP/2 flow control is the backpressure under the session's window.
5. Every refusal or cut is a WARNING, rate-limited per peer host and reason,
   with peer-supplied text clipped, and a count in
   ``syncfw_refused_streams{reason}`` when the server has the node's metrics.
4. A non-OK end of an exchange on the server becomes the call's gRPC status
   (code and details), so any gRPC client sees a clear status too.
6. Under mTLS identity is bound on both ends. The server binds the client
   certificate's node id (CN) to its Hello. The dialer binds the server's
   certificate to a node id before any frame goes: the id it meant to dial
   when the caller names it, else the id a verified TLS handshake with the
   address showed (:func:`learn_identity`: grpc-python exposes no peer
   certificate to a client). That id becomes the channel's
   ``grpc.ssl_target_name_override``, so grpc's own handshake checks it against
   the certificate's SAN on every connection, and the stream's
   :attr:`~GrpcStream.peer_identity`, so a Hello under another id is refused.
   A dial refused for identity is a WARNING (rate-limited) and a count in
   ``syncfw_refused_streams{reason}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
import grpc.aio

from syncfw.errors import KeyFileError
from syncfw.keyfiles import certificate_identity, is_subscriber
from syncfw.metrics import NodeMetrics
from syncfw.notices import Notices, clip, clip_text
from syncfw.sync.frames import Status
from syncfw.transport._pb import health_pb2, health_pb2_grpc, sync_pb2
from syncfw.transport.admission import Admission, Refusal, cpu_budget_of, peer_host
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.config import TlsConfig, TransportConfig
from syncfw.transport.front import FrontDoor, source_of
from syncfw.transport.health import SERVICE, HealthServicer, check_health
from syncfw.transport.probe import MAX_TARGET_CHARS, ProbeAnswer, ProbeHandler

__all__ = [
    "ChannelPool",
    "GrpcServer",
    "GrpcStream",
    "TlsConfig",
    "TransportConfig",
    "check_health",
    "client_ssl_context",
    "learn_identity",
]

log = logging.getLogger("syncfw.transport")


class _EndedCallFilter(logging.Filter):
    """grpc's own ERROR-with-traceback when it cannot finish a call the node already
    ended (a cut at the deadline, a peer gone mid-write), as one rate-limited line.

    grpc-python logs ``ExecuteBatchError raised in core by servicer method`` on
    logger ``grpc._cython.cygrpc`` each time; the call's end is already counted
    and warned about by the server (invariant 5), so the traceback says nothing
    new, and a peer could make it repeat without bound.
    """

    def __init__(self) -> None:
        super().__init__()
        self.notices = Notices(log, 10.0, max_keys=4)
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ != "ExecuteBatchError":
            return True
        self.dropped += 1
        self.notices.warn(
            "grpc_ended_call", 1,
            "grpc could not finish a call this node had already ended (peer gone or "
            "cut at its deadline): %s", clip(str(exc), 120),
        )
        return False


_ENDED_CALLS = _EndedCallFilter()
logging.getLogger("grpc._cython.cygrpc").addFilter(_ENDED_CALLS)

EXCHANGE = "/syncfw.v1.Sync/Exchange"
PROBE = "/syncfw.v1.Sync/Probe"
# Frames cross gRPC as the bytes wire.encode_frame makes (identity
# serializers), so every transport carries the very same bytes and a
# malformed frame surfaces in the exchange runner, as DecodeError, not in grpc.
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


def _same_bytes(data: bytes) -> bytes:
    """The identity (de)serializer: the Exchange method carries opaque bytes."""
    return data


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


_ENDED_WAIT_S = 2.0  # how long a failed client write waits for the call's own status


async def _drain_first(requests: AsyncIterator[bytes]) -> None:
    """Read a refused client's first message (briefly) before ending its call.

    A call ended before the client's first write lands races that write, and
    grpc then reports ``INTERNAL`` ("Internal error from Core") to the client
    instead of the status set here.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(_ENDED_WAIT_S):
            await anext(aiter(requests))


class GrpcStream:
    """A :class:`FrameStream` over one gRPC ``Exchange`` call, either side.

    It holds no queue of its own: at most one message is in flight each way
    (a write awaits grpc's flow control; a read returns one message), so what
    a peer can make this side buffer is bounded by the HTTP/2 window grpc
    grants plus one message of at most ``max_message_bytes``; the exchange
    runner's receive queue (``2 * window + 8`` frames) is the only queue above it.

    Args:
        call: the client call (dialing side), or
        context: the server call's context (serving side).
        peer_address: the other end, for logs.
        peer_identity: the node id the link authenticated (mTLS), if any.
        first: on the server, the first message, already read by the servicer
            (:data:`_EOF` if the peer finished before sending one).
    """

    def __init__(
        self,
        *,
        call: grpc.aio.StreamStreamCall[bytes, bytes] | None = None,
        context: grpc.aio.ServicerContext[bytes, bytes] | None = None,
        peer_address: str = "",
        peer_identity: str | None = None,
        first: object = None,
    ) -> None:
        if (call is None) == (context is None):
            raise ValueError("a GrpcStream wraps a client call or a server context")
        self._call = call
        self._ctx = context
        self._peer = peer_address
        self.peer_identity = peer_identity
        self._first = first
        self._closed = False
        self._writing = False
        self.end_status: Status | None = None
        self.end_reason = ""
        self.last_progress = time.monotonic()
        """When a message last arrived or a write last completed (the server's idle cut)."""

    @property
    def write_blocked(self) -> bool:
        """True if a write was started and never completed (cut while flow control held it)."""
        return self._writing

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
        if self._writing:  # grpc allows one write at a time; the last one never completed
            raise LinkError(Status.ABORTED, "a previous write is still blocked on flow control")
        self._writing = True  # stays set if the write is cancelled while flow control holds it
        try:
            if self._call is not None:
                await self._call.write(msg)
            else:
                assert self._ctx is not None
                await self._ctx.write(msg)
            self._writing = False
            self.last_progress = time.monotonic()
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            self._writing = False
            raise await self._ended_with(_translate(exc)) from None
        except (grpc.RpcError, grpc.aio.BaseError) as exc:  # e.g. the call ended under us
            self._writing = False
            raise await self._ended_with(
                LinkError(Status.ABORTED, f"write failed: {exc!r}")
            ) from None

    async def _ended_with(self, fallback: LinkError) -> LinkError:
        """The status the peer ended the call with, if it did (a write raced its end).

        A client write that races the server's end of the call fails locally
        (``INTERNAL``, "Internal error from Core") a moment before the call is
        done: wait briefly for the server's own status rather than hide it.
        """
        if self._call is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(_ENDED_WAIT_S):
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
                if self._first is not None:
                    msg, self._first = self._first, None
                else:
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
        self.last_progress = time.monotonic()
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


_REFUSED_TEXT = {
    Refusal.GLOBAL_CAP: "server busy: every exchange slot is taken",
    Refusal.PEER_QUOTA: "too many exchanges at once from this address",
    Refusal.IDENTITY_QUOTA: "too many exchanges at once from this node id",
    Refusal.CONNECTION_QUOTA: "too many exchanges at once on this connection",
    Refusal.CPU_BUDGET: "this peer's batches used up its CPU budget; retry later",
}
_HANDLER_GRACE_S = 1.0  # the handler's own deadline (the same figure) speaks first
# refusals a peer brings on itself, answered after Quotas.refusal_hold_s (admission, invariant 2)
_HELD_REFUSALS = frozenset(
    {Refusal.PEER_QUOTA, Refusal.IDENTITY_QUOTA, Refusal.CONNECTION_QUOTA, Refusal.CPU_BUDGET}
)


class _SyncServicer:
    """``Exchange``: admission, the first-frame deadline, the hard deadline, then the handler."""

    def __init__(
        self, handler: ExchangeHandler, config: TransportConfig, metrics: NodeMetrics | None
    ) -> None:
        self._handler = handler
        self._config = config
        self._metrics = metrics
        self.admission = Admission(
            config.quotas(), cpu=cpu_budget_of(metrics) if metrics is not None else None
        )
        self.refusals = Notices(log, config.refusal_log_interval_s, max_keys=1024)

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

    def _refused(self, peer: str, reason: Refusal, detail: str) -> None:
        """One WARNING (rate-limited per peer host and reason) and one count."""
        self.refusals.warn(
            f"{peer_host(peer)}|{reason.value}",
            1,
            "refused a stream from %s (%s): %s",
            clip(peer),
            reason.value,
            detail,
        )
        if self._metrics is not None:
            self._metrics.refused_streams.labels(self._metrics.node_id, reason.value).inc()

    async def Exchange(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> None:
        peer, identity = source_of(context.peer()), _identity(context)
        if identity is not None and is_subscriber(identity):
            # a subscriber certificate reads the change feed and never writes
            self.refusals.warn(
                f"{peer_host(peer)}|subscriber", 1,
                "refused a stream from %s (subscriber): %s may read the feed, never sync",
                clip(peer), clip(identity),
            )
            if self._metrics is not None:
                self._metrics.refused_streams.labels(self._metrics.node_id, "subscriber").inc()
            await _drain_first(request_iterator)
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)  # as for any identity refused
            context.set_details("a subscriber certificate may read the change feed, never sync")
            return
        ticket = self.admission.admit(peer, identity)
        if isinstance(ticket, Refusal):
            self._refused(peer, ticket, _REFUSED_TEXT[ticket])
            if ticket in _HELD_REFUSALS:
                await self._hold(peer)
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(f"{_REFUSED_TEXT[ticket]} ({ticket.value})")
            return
        stalled = False
        try:
            first = await self._first_message(context, peer)
            if first is not None:
                stream = GrpcStream(
                    context=context, peer_address=peer, peer_identity=identity, first=first
                )
                stalled = await self._serve(stream, context, peer)
        finally:
            self.admission.release(ticket, stalled=stalled)
        if stalled:
            # grpc would wait for the blocked write before sending a status, and
            # hold the call (and its slot) for as long as the peer keeps its
            # window shut. Ending the handler with CancelledError sends nothing;
            # the connection's age limit frees the call in grpc itself.
            raise asyncio.CancelledError

    async def _hold(self, peer: str) -> None:
        """Wait ``refusal_hold_s`` before answering a refusal, when admission allows.

        The call keeps its HTTP/2 stream meanwhile, so a peer that reopens
        whatever is refused is held to its stream limit per hold on each
        connection; the wait costs no CPU, and nothing of the call is read.
        """
        if not self.admission.hold(peer):
            return
        try:
            await asyncio.sleep(self.admission.quotas.refusal_hold_s)
        finally:
            self.admission.unhold(peer)

    async def _first_message(
        self, context: grpc.aio.ServicerContext[bytes, bytes], peer: str
    ) -> object | None:
        """The peer's first message within ``hello_timeout_s``; None if the call is over."""
        limit = self._config.hello_timeout_s
        try:
            async with asyncio.timeout(limit):
                return await context.read()
        except TimeoutError:
            reason = f"no first frame within {limit}s of opening the stream"
            self._refused(peer, Refusal.NO_HELLO, reason)
            context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
            context.set_details(reason)
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
            pass  # the peer is gone before saying anything
        return None

    async def _serve(
        self, stream: GrpcStream, context: grpc.aio.ServicerContext[bytes, bytes], peer: str
    ) -> bool:
        """Run the handler under the idle and total deadlines; True if it left a write blocked.

        An exchange that makes progress (a message read, a write completed) within every
        ``exchange_timeout_s`` runs on, up to ``max_exchange_s`` in all, so a thin link's
        long catch-up is never cut; one that stalls — a window held shut, a silent peer —
        is cut ``exchange_timeout_s`` after its last progress.
        """
        idle = self._config.exchange_timeout_s + _HANDLER_GRACE_S
        cap = max(self._config.max_exchange_s, idle)
        start = time.monotonic()
        task = asyncio.ensure_future(self._handler(stream))
        try:
            while True:
                now = time.monotonic()
                due = min(stream.last_progress + idle, start + cap)
                if now >= due:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    if not stream.write_blocked:
                        context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
                        what = (
                            f"exchange took over {cap}s" if now >= start + cap
                            else f"exchange made no progress for {idle}s"
                        )
                        context.set_details(what)
                    break
                done, _ = await asyncio.wait({task}, timeout=due - now)
                if done:
                    task.result()
                    break
        except Exception:  # never let a handler bug leak a grpc traceback to the peer
            log.exception("exchange handler failed for %s", peer)
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details("internal error")
        finally:
            if not task.done():  # the call itself was cancelled (the peer went away)
                task.cancel()
        if stream.write_blocked:
            self._refused(
                peer,
                Refusal.STALLED,
                "its window stayed shut past the exchange deadline: call cut, slot reclaimed",
            )
            return True
        return False


class GrpcServer:
    """A running grpc.aio server for ``syncfw.v1.Sync`` and ``grpc.health.v1.Health``.

    Start with :meth:`start`; stop with :meth:`aclose`.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        host: str,
        health: HealthServicer,
        servicer: _SyncServicer,
        front: FrontDoor | None = None,
    ) -> None:
        self._server = server
        self.port = port
        self.host = host
        self._health = health
        self._servicer = servicer
        self.front = front
        """The front door the port is served through (None when ``config.front_door`` is off)."""

    @property
    def admission(self) -> Admission:
        """The server's admission bookkeeping (what it serves, per peer)."""
        return self._servicer.admission

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
        metrics: NodeMetrics | None = None,
        probe: ProbeHandler | None = None,
        services: Sequence[grpc.GenericRpcHandler[Any, Any]] = (),
    ) -> GrpcServer:
        """Listen on ``listen`` (``host:port``; port 0 picks a free one).

        With ``config.tls`` the server requires client certificates from the
        fleet CA (mutual TLS) and binds each exchange to the certificate's node id.
        Each call is admitted against the quotas of ``config`` (per connection,
        peer address, identity, and overall), must send its first frame within
        ``config.hello_timeout_s``, and is cut at ``config.exchange_timeout_s``
        even when a write is blocked on flow control.

        Args:
            listen: address to bind.
            handler: runs one exchange on each incoming stream.
            config: transport tunables.
            metrics: the node's registry; refused and cut streams are counted
                in ``syncfw_refused_streams{reason}``.
            probe: serves ``syncfw.v1.Sync/Probe`` (None: the method is
                UNIMPLEMENTED, which a prober reads as "alive, no helper").
            services: more services on the same port and credentials (the
                change feed, :func:`syncfw.transport.feed.feed_service`).

        Raises:
            LinkError: ``UNAVAILABLE``: the address cannot be bound.
        """
        cfg = config or TransportConfig()
        # No maximum_concurrent_rpcs: grpc's limiter holds a slot until grpc
        # frees the call, which a peer with a shut window delays for as long as
        # its connection lives; admission (per peer, then overall) does it.
        server = grpc.aio.server(options=cfg.server_options())
        servicer = _SyncServicer(handler, cfg, metrics)
        server.add_generic_rpc_handlers((servicer.generic_handler(),))
        if probe is not None:
            server.add_generic_rpc_handlers((_probe_service(probe),))
        if services:
            server.add_generic_rpc_handlers(tuple(services))
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)  # type: ignore[no-untyped-call]
        host, _, wanted = listen.rpartition(":")
        host = host or "127.0.0.1"
        # Behind the front door, grpc listens on a loopback port of its own.
        bind = "127.0.0.1:0" if cfg.front_door else listen
        try:
            if cfg.tls is None:
                port = server.add_insecure_port(bind)
            else:
                creds = grpc.ssl_server_credentials(
                    [(cfg.tls.key_pem, cfg.tls.cert_pem)],
                    root_certificates=cfg.tls.ca_pem,
                    require_client_auth=True,
                )
                port = server.add_secure_port(bind, creds)
        except RuntimeError as exc:
            raise LinkError(Status.UNAVAILABLE, f"cannot listen on {listen}: {exc}") from None
        if port == 0:
            raise LinkError(Status.UNAVAILABLE, f"cannot listen on {listen}")
        await server.start()
        front = None
        if cfg.front_door:
            try:
                front = await FrontDoor.start(
                    host.strip("[]"), int(wanted or 0), port, cfg.front_limits(), metrics
                )
            except (OSError, ValueError) as exc:
                await server.stop(0)
                raise LinkError(Status.UNAVAILABLE, f"cannot listen on {listen}: {exc}") from None
            port = front.port
        return cls(server, port, host, health, servicer, front)

    async def aclose(self, grace_s: float = 1.0) -> None:
        """Report NOT_SERVING, let running exchanges finish for ``grace_s``, stop."""
        self._health.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(grace_s)
        if self.front is not None:
            await self.front.aclose()


class ChannelPool:
    """One gRPC channel per peer address (and, under mTLS, per bound node id), reused.

    Under mTLS every channel is bound to the node id the server's certificate
    must name (invariant 6): the id the caller expects, else the one learned
    from the address with a verified handshake, remembered until :meth:`drop`.

    Args:
        config: transport tunables (keepalive, deadlines, message size, TLS).
        metrics: the node's registry; dials refused for identity are counted in
            ``syncfw_refused_streams{reason}``.
    """

    def __init__(
        self, config: TransportConfig | None = None, *, metrics: NodeMetrics | None = None
    ) -> None:
        self.config = config or TransportConfig()
        self.metrics = metrics
        self._channels: dict[str, grpc.aio.Channel] = {}
        # address -> (the node id its certificate showed, whether its SAN names it)
        self._bound: dict[str, tuple[str, bool]] = {}
        self._ssl: ssl.SSLContext | None = None
        self.refusals = Notices(log, self.config.refusal_log_interval_s, max_keys=1024)

    def channel(self, address: str, identity: str | None = None) -> grpc.aio.Channel:
        """The pooled channel to ``address`` (created on first use).

        Args:
            address: ``host:port``.
            identity: under mTLS, the node id the server's certificate must name
                (its SAN); None checks the dialed host (or ``tls.server_name``).
        """
        key = address if identity is None else f"{address}|{identity}"
        ch = self._channels.get(key)
        if ch is None:
            tls = self.config.tls
            options = self.config.channel_options()
            if tls is None:
                ch = grpc.aio.insecure_channel(address, options=options)
            else:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=tls.ca_pem,
                    private_key=tls.key_pem,
                    certificate_chain=tls.cert_pem,
                )
                if identity is not None:
                    options = [o for o in options if o[0] != "grpc.ssl_target_name_override"]
                    options.append(("grpc.ssl_target_name_override", identity))
                ch = grpc.aio.secure_channel(address, creds, options=options)
            self._channels[key] = ch
        return ch

    def _refused(self, address: str, reason: str, detail: str) -> LinkError:
        """A dial refused for identity: one rate-limited WARNING, one count, the error."""
        self.refusals.warn(
            f"{address}|{reason}", 1, "refused to exchange with %s (%s): %s",
            clip(address), reason, detail,
        )
        if self.metrics is not None:
            self.metrics.refused_streams.labels(self.metrics.node_id, reason).inc()
        return LinkError(
            Status.UNAVAILABLE if reason == "server_certificate" else Status.FAILED_PRECONDITION,
            detail,
        )

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            tls = self.config.tls
            assert tls is not None
            self._ssl = client_ssl_context(tls)
        return self._ssl

    async def identity(
        self, address: str, *, expect_id: str | None = None, timeout_s: float | None = None
    ) -> tuple[str | None, str | None]:
        """The node id a dial to ``address`` is bound to, and the SAN grpc checks.

        Returns:
            ``(identity, san)``: the node id (None without TLS) and the name the
            channel's handshake checks the certificate's SAN against (None: the
            dialed host, for a certificate whose SAN does not name its node).

        Args:
            address: ``host:port``.
            expect_id: the node id the caller means to dial; bound as is (grpc's
                handshake then refuses a certificate that does not name it).
            timeout_s: for learning the id (default: ``connect_timeout_s``).

        Raises:
            LinkError: ``UNAVAILABLE``: no verified handshake with the address
                (unreachable, no certificate, another fleet's CA), counted as
                ``server_certificate``.
        """
        tls = self.config.tls
        if tls is None:
            return None, None
        if expect_id is not None:
            return expect_id, expect_id
        known = self._bound.get(address)
        if known is None:
            known = await self._learn(address, timeout_s)
            self._bound[address] = known
        node, pinned = known
        return node, node if pinned else None

    async def _learn(self, address: str, timeout_s: float | None) -> tuple[str, bool]:
        try:
            node, sans = await learn_identity(
                address, self._ssl_context(), proxy=self.config.http_proxy,
                timeout_s=timeout_s if timeout_s is not None else self.config.connect_timeout_s,
            )
        except ssl.SSLError as exc:
            raise self._refused(
                address, "server_certificate",
                f"{address} did not prove a fleet certificate: {exc.reason or exc}",
            ) from None
        except (OSError, TimeoutError, ValueError) as exc:
            raise LinkError(Status.UNAVAILABLE, f"{address} unreachable: {exc!r}") from None
        if node not in sans:
            self.refusals.warn(
                f"{address}|san", 1,
                "the certificate of %s names %s in its CN but not its SAN: the dial is "
                "bound to it by the handshake's host check only; reissue it (syncfw keys add-node)",
                clip(address), clip(node),
            )
        return node, node in sans

    async def open(
        self, address: str, *, timeout_s: float | None = None, expect_id: str | None = None
    ) -> GrpcStream:
        """Open an ``Exchange`` call to ``address``.

        Args:
            address: ``host:port`` of the peer.
            timeout_s: the call's deadline (default: ``max_exchange_s``; the
                runner cuts an exchange that stops progressing).
            expect_id: under mTLS, the node id the caller means to dial; None:
                the id the address's certificate names (invariant 6).

        Raises:
            LinkError: ``UNAVAILABLE`` if the peer cannot be reached in
                ``connect_timeout_s`` (or shows no fleet certificate);
                ``FAILED_PRECONDITION`` if its certificate names another node
                than the one bound.
        """
        identity, san = await self.identity(address, expect_id=expect_id)
        ch = self.channel(address, san)
        try:
            async with asyncio.timeout(self.config.connect_timeout_s):
                await ch.channel_ready()
        except TimeoutError:
            raise await self._unready(address, identity) from None
        except grpc.aio.UsageError:  # the channel was dropped (a peer declared dead) meanwhile
            raise LinkError(
                Status.UNAVAILABLE, f"{address}: channel closed while dialing"
            ) from None
        except grpc.RpcError as exc:  # pragma: no cover
            raise LinkError(Status.UNAVAILABLE, f"{address}: {exc!r}") from None
        method: Any = ch.stream_stream(  # bytes in, bytes out
            EXCHANGE, request_serializer=_same_bytes, response_deserializer=_same_bytes
        )
        call = method(
            timeout=timeout_s if timeout_s is not None else self.config.max_exchange_s
        )
        return GrpcStream(call=call, peer_address=address, peer_identity=identity)

    async def _unready(self, address: str, identity: str | None) -> LinkError:
        """Why a channel never became ready: unreachable, or a certificate for another id."""
        plain = LinkError(Status.UNAVAILABLE, f"{address} unreachable")
        if identity is None:
            return plain
        self._bound.pop(address, None)  # the next dial learns the address afresh
        try:
            shown, _ = await learn_identity(
                address, self._ssl_context(), proxy=self.config.http_proxy,
                timeout_s=min(1.0, self.config.connect_timeout_s),
            )
        except ssl.SSLError as exc:
            return self._refused(
                address, "server_certificate",
                f"{address} did not prove a fleet certificate: {exc.reason or exc}",
            )
        except (OSError, TimeoutError, ValueError):
            return plain
        if shown != identity:
            return self._refused(
                address, "server_identity",
                f"{address} presents a certificate for {clip(shown)}, not {identity!r}",
            )
        return plain

    async def probe(self, address: str, *, target: str = "", timeout_s: float) -> ProbeAnswer:
        """Probe ``address`` on its pooled channel (see :mod:`syncfw.transport.probe`).

        Args:
            address: the peer asked.
            target: "" for a direct probe; else the member the peer should
                probe on this node's behalf (given ``timeout_s / 2`` for it).
            timeout_s: the whole call's deadline.

        Returns:
            The answer; a peer that does not serve Probe (UNIMPLEMENTED) is
            alive for a direct probe and no help for an indirect one. Never raises.
        """
        try:
            _, san = await self.identity(address, timeout_s=timeout_s)
        except LinkError as exc:
            return ProbeAnswer(False, "", exc.reason)
        method: Any = self.channel(address, san).unary_unary(
            PROBE,
            request_serializer=sync_pb2.ProbeRequest.SerializeToString,
            response_deserializer=sync_pb2.ProbeReply.FromString,
        )
        inner_ms = int(timeout_s * 500) if target else 0
        try:
            reply = await method(
                sync_pb2.ProbeRequest(target=target, timeout_ms=inner_ms), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                return ProbeAnswer(not target, "", "the peer does not serve Probe")
            return ProbeAnswer(False, "", f"{exc.code().name}: {clip_text(exc.details() or '')}")
        except (grpc.RpcError, grpc.aio.UsageError) as exc:  # pragma: no cover - a closed channel
            return ProbeAnswer(False, "", f"probe failed: {exc!r}")
        return ProbeAnswer(bool(reply.reachable), clip_text(reply.node_id), clip_text(reply.reason))

    async def drop(self, address: str) -> None:
        """Close the channels to ``address`` (a dead peer) and forget the id bound to it."""
        self._bound.pop(address, None)
        for key in [k for k in self._channels if k == address or k.startswith(f"{address}|")]:
            await self._channels.pop(key).close(None)

    async def aclose(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        self._bound.clear()
        for ch in channels:
            await ch.close(None)


def client_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A TLS client context that proves this node's certificate and trusts only the fleet CA.

    No hostname check: the server's node id is what :func:`learn_identity` reads.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=tls.ca_pem.decode("ascii", "replace"))
    ctx.set_alpn_protocols(["h2"])
    # ssl loads a key pair only from files: a private folder, gone once loaded
    with tempfile.TemporaryDirectory(prefix="syncfw-tls-") as tmp:
        cert, key = os.path.join(tmp, "node.crt"), os.path.join(tmp, "node.key")
        for path, data in ((cert, tls.cert_pem), (key, tls.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        ctx.load_cert_chain(cert, key)
    return ctx


async def learn_identity(
    address: str, context: ssl.SSLContext, *, proxy: str | None = None, timeout_s: float
) -> tuple[str, tuple[str, ...]]:
    """The node id (CN) and DNS SANs of the certificate ``address`` proves in a verified
    TLS handshake.

    The handshake checks the certificate against the fleet CA (``context``) and
    presents this node's own; nothing is sent after it. Through ``proxy`` (an
    HTTP CONNECT proxy, like grpc's ``grpc.http_proxy``) when given.

    Raises:
        ssl.SSLError: the server proves no certificate of the fleet CA.
        OSError, TimeoutError, ValueError: the address cannot be reached.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    async with asyncio.timeout(timeout_s):
        if proxy:
            parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            try:
                writer.write(f"CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]:
                    raise ConnectionRefusedError(f"proxy refused CONNECT {address}")
                await writer.start_tls(context)
            except BaseException:
                writer.close()
                raise
        else:
            reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
        try:
            obj = writer.get_extra_info("ssl_object")
            der = obj.getpeercert(binary_form=True) if obj is not None else None
            if not der:
                raise ssl.SSLError("the server sent no certificate")
            try:
                return certificate_identity(ssl.DER_cert_to_PEM_cert(der).encode("ascii"))
            except KeyFileError as exc:
                raise ssl.SSLError(str(exc)) from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _probe_service(probe: ProbeHandler) -> grpc.GenericRpcHandler[Any, Any]:
    """``syncfw.v1.Sync/Probe``, served by ``probe`` (beside the Exchange handler)."""

    async def serve(
        request: sync_pb2.ProbeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sync_pb2.ProbeReply:
        if len(request.target) > MAX_TARGET_CHARS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"target over {MAX_TARGET_CHARS} chars"
            )
        try:
            answer = await probe(request.target, request.timeout_ms / 1000)
        except Exception:  # never let a handler bug leak a traceback to the peer
            log.exception("probe handler failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        return sync_pb2.ProbeReply(
            reachable=answer.reachable, node_id=answer.node_id, reason=answer.reason
        )

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Probe": grpc.unary_unary_rpc_method_handler(
                serve,
                request_deserializer=sync_pb2.ProbeRequest.FromString,
                response_serializer=sync_pb2.ProbeReply.SerializeToString,
            )
        },
    )
