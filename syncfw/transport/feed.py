"""The change feed on gRPC: ``syncfw.v1.Feed/Subscribe`` (``protos/syncfw/v1/feed.proto``).

The transport half only: the server adapts one call to a :data:`FeedHandler`
(what to stream is decided above, in :mod:`syncfw.cloud.feed`, from
``follow()``), the client turns a call into an async iterator of
:class:`FeedRecord` and :class:`FeedCheckpoint`.

Invariants:

1. grpc stays in this package: a call's end is a :class:`LinkError` (status
   and reason), or :class:`FeedPositionError` with the ``missing`` seqs the
   server named in the ``syncfw-missing`` trailer; no grpc exception leaves.
2. The request is bounded before anything is read: at most
   :data:`MAX_VECTOR_ENTRIES` vector entries and :data:`MAX_PREFIXES`
   prefixes of at most :data:`MAX_PREFIX_BYTES` bytes, origins at most 256
   chars; beyond: ``INVALID_ARGUMENT`` naming the field and the limit.
3. The servicer holds no queue: each message is written and awaited (HTTP/2
   flow control), so a subscriber can make the server hold at most one
   message plus what the handler holds (a ``follow()`` page). A write that
   stays blocked past ``stall_s`` abandons the call (a WARNING, and a count
   in ``syncfw_refused_streams{reason="feed_stalled"}``).
4. Handler outcomes map to statuses: :class:`FeedPositionError` is
   ``OUT_OF_RANGE`` (with the trailer), :class:`LinkError` its own status,
   ``ValueError`` ``INVALID_ARGUMENT``; any other failure is ``INTERNAL``
   with no traceback sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from syncfw.errors import FeedPositionError
from syncfw.log import MAX_KEY_BYTES, Op
from syncfw.metrics import NodeMetrics
from syncfw.notices import Notices, clip, clip_text
from syncfw.sync.frames import Status
from syncfw.transport._pb import feed_pb2
from syncfw.transport.base import LinkError
from syncfw.transport.front import source_of

__all__ = [
    "FEED_SERVICE",
    "MAX_PREFIXES",
    "MAX_PREFIX_BYTES",
    "MAX_VECTOR_ENTRIES",
    "FeedBatch",
    "FeedCheckpoint",
    "FeedEvent",
    "FeedHandler",
    "FeedRecord",
    "FeedRequest",
    "feed_service",
    "subscribe",
]

log = logging.getLogger("syncfw.transport.feed")

FEED_SERVICE = "syncfw.v1.Feed"
SUBSCRIBE = f"/{FEED_SERVICE}/Subscribe"
MISSING_TRAILER = "syncfw-missing"
MAX_VECTOR_ENTRIES = 100_000
MAX_PREFIXES = 64
MAX_PREFIX_BYTES = MAX_KEY_BYTES
_MAX_ORIGIN_CHARS = 256


@dataclass(frozen=True, slots=True)
class FeedRequest:
    """What a subscriber asks for.

    Attributes:
        since: the version vector it already processed.
        prefixes: deliver only keys under one of these (all when empty).
        include_rejected: also deliver ops stored as rejected.
    """

    since: Mapping[str, int] = field(default_factory=dict)
    prefixes: tuple[str, ...] = ()
    include_rejected: bool = False


@dataclass(frozen=True, slots=True)
class FeedRecord:
    """One op of the feed, as it crosses the wire.

    Attributes:
        op: the op (payload as stored).
        rejected: stored as rejected on the server.
        local: written by the serving node.
    """

    op: Op
    rejected: bool = False
    local: bool = False


@dataclass(frozen=True, slots=True)
class FeedCheckpoint:
    """The vector to resume from after everything received so far.

    Attributes:
        position: every op delivered or passed over (by prefix) so far.
        lag_ops: ops the server held beyond it when it was sent.
    """

    position: dict[str, int]
    lag_ops: int = 0


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """Ops ready at once, sent as one message (in feed order)."""

    records: tuple[FeedRecord, ...]


FeedEvent = FeedRecord | FeedCheckpoint
"""What a subscriber receives, op by op (:func:`subscribe` unpacks batches)."""
FeedHandler = Callable[[FeedRequest, "str | None"], AsyncGenerator["FeedBatch | FeedCheckpoint", None]]
"""Serves one subscription: ``(request, the caller's certificate identity or None)``."""


# ------------------------------------------------------------------ encoding


def _vv_pb(vv: Mapping[str, int]) -> list[feed_pb2.FeedVvEntry]:
    return [feed_pb2.FeedVvEntry(origin=o, seq=s) for o, s in sorted(vv.items())]


def request_pb(req: FeedRequest) -> feed_pb2.SubscribeRequest:
    """The protobuf request for ``req``."""
    return feed_pb2.SubscribeRequest(
        since=_vv_pb(req.since), prefixes=list(req.prefixes), include_rejected=req.include_rejected
    )


def parse_request(msg: feed_pb2.SubscribeRequest) -> FeedRequest:
    """A checked :class:`FeedRequest` (invariant 2).

    Raises:
        ValueError: a field over its limit, or an origin given twice.
    """
    if len(msg.since) > MAX_VECTOR_ENTRIES:
        raise ValueError(f"since holds over {MAX_VECTOR_ENTRIES} entries")
    if len(msg.prefixes) > MAX_PREFIXES:
        raise ValueError(f"over {MAX_PREFIXES} prefixes")
    since: dict[str, int] = {}
    for e in msg.since:
        if not e.origin or len(e.origin) > _MAX_ORIGIN_CHARS:
            raise ValueError(f"a since origin is empty or over {_MAX_ORIGIN_CHARS} chars")
        if e.origin in since:
            raise ValueError(f"since names origin {clip(e.origin)} twice")
        since[e.origin] = int(e.seq)
    for p in msg.prefixes:
        if len(p.encode("utf-8")) > MAX_PREFIX_BYTES:
            raise ValueError(f"a prefix is over {MAX_PREFIX_BYTES} bytes")
    return FeedRequest(since, tuple(msg.prefixes), bool(msg.include_rejected))


def _op_pb(rec: FeedRecord) -> feed_pb2.FeedOp:
    op = rec.op
    return feed_pb2.FeedOp(
        origin=op.origin, seq=op.seq, hlc=op.hlc, zone=op.zone, epoch=op.epoch,
        key=op.key, kind=op.kind, value=op.value, prev=op.prev, sig=op.sig or b"",
        rejected=rec.rejected, local=rec.local,
    )


def _event_pb(event: FeedBatch | FeedCheckpoint) -> feed_pb2.FeedMessage:
    if isinstance(event, FeedBatch):
        return feed_pb2.FeedMessage(
            batch=feed_pb2.FeedBatch(ops=[_op_pb(r) for r in event.records])
        )
    return feed_pb2.FeedMessage(
        position=feed_pb2.FeedPosition(vv=_vv_pb(event.position), lag_ops=event.lag_ops)
    )


def _events_of(msg: feed_pb2.FeedMessage) -> list[FeedEvent]:
    body = msg.WhichOneof("body")
    if body == "batch":
        return [
            FeedRecord(
                Op(o.origin, o.seq, o.hlc, o.zone, o.epoch, o.key, o.kind, o.value, o.prev,
                   o.sig or None),
                o.rejected, o.local,
            )
            for o in msg.batch.ops
        ]
    if body == "position":
        return [FeedCheckpoint({e.origin: int(e.seq) for e in msg.position.vv},
                               int(msg.position.lag_ops))]
    raise LinkError(Status.INVALID_ARGUMENT, "a feed message with no body")


# ------------------------------------------------------------------ server


def feed_service(
    handler: FeedHandler,
    *,
    stall_s: float = 30.0,
    metrics: NodeMetrics | None = None,
    notice_interval_s: float = 60.0,
) -> grpc.GenericRpcHandler[Any, Any]:
    """``syncfw.v1.Feed/Subscribe``, served by ``handler`` (see the module's invariants).

    Args:
        handler: streams one subscription.
        stall_s: a write blocked on flow control this long abandons the call.
        metrics: counts abandoned calls in ``syncfw_refused_streams{reason}``.
        notice_interval_s: WARNINGs per subscriber host at most this often.
    """
    notices = Notices(log, notice_interval_s, max_keys=1024)

    def refused(peer: str, reason: str, detail: str) -> None:
        notices.warn(f"{peer}|{reason}", 1, "feed subscriber %s (%s): %s", clip(peer), reason,
                     detail)
        if metrics is not None:
            metrics.refused_streams.labels(metrics.node_id, reason).inc()

    async def serve(
        request: feed_pb2.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        peer = source_of(context.peer())
        names = list(context.auth_context().get("x509_common_name") or [])
        identity = names[0].decode("utf-8", "replace") if names else None
        try:
            req = parse_request(request)
        except ValueError as exc:
            refused(peer, "feed_request", str(exc))
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            async with contextlib.aclosing(handler(req, identity)) as events:
                async for event in events:
                    try:
                        async with asyncio.timeout(stall_s):
                            await context.write(_event_pb(event))
                    except TimeoutError:
                        refused(peer, "feed_stalled",
                                f"read nothing for {stall_s}s: call abandoned (it may resume)")
                        raise asyncio.CancelledError from None
        except FeedPositionError as exc:
            missing = json.dumps({o: list(r) for o, r in exc.missing.items()})
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc)[:1000],
                                ((MISSING_TRAILER, missing[:8000]),))
        except LinkError as exc:
            refused(peer, f"feed_{exc.status.name.lower()}", exc.reason)
            await context.abort(grpc.StatusCode[exc.status.name], exc.reason[:1000])
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:1000])
        except (grpc.RpcError, grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except grpc.aio.UsageError:
            return  # the subscriber went away mid-write
        except Exception:  # never leak a traceback to a subscriber
            log.exception("feed handler failed for %s", clip(peer))
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return grpc.method_handlers_generic_handler(
        FEED_SERVICE,
        {
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                serve,
                request_deserializer=feed_pb2.SubscribeRequest.FromString,
                response_serializer=feed_pb2.FeedMessage.SerializeToString,
            )
        },
    )


# ------------------------------------------------------------------ client


def _missing_of(trailers: Any) -> dict[str, tuple[int, int]]:
    for k, v in trailers or ():
        if k == MISSING_TRAILER:
            try:
                raw = json.loads(v)
                return {str(o): (int(a), int(b)) for o, (a, b) in raw.items()}
            except (ValueError, TypeError):
                return {}
    return {}


async def subscribe(
    channel: grpc.aio.Channel, request: FeedRequest, *, timeout_s: float | None = None
) -> AsyncGenerator[FeedEvent, None]:
    """Stream ``request`` from the server on ``channel`` (a pooled channel, mTLS or not).

    Yields:
        :class:`FeedRecord` and :class:`FeedCheckpoint`, as the server sends them.

    Raises:
        FeedPositionError: the server cannot serve from ``request.since``.
        LinkError: any other end but OK (``UNAVAILABLE`` when unreachable,
            ``RESOURCE_EXHAUSTED`` past the server's lag limit, ...).
    """
    method: Any = channel.unary_stream(
        SUBSCRIBE,
        request_serializer=feed_pb2.SubscribeRequest.SerializeToString,
        response_deserializer=feed_pb2.FeedMessage.FromString,
    )
    call = method(request_pb(request), timeout=timeout_s)
    try:
        async for msg in call:
            for event in _events_of(msg):
                yield event
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), clip_text(exc.details() or exc.code().name, 1000)
        if code is grpc.StatusCode.OUT_OF_RANGE:
            raise FeedPositionError(details, _missing_of(exc.trailing_metadata())) from None
        try:
            status = Status(code.value[0])
        except ValueError:
            status = Status.INTERNAL
        raise LinkError(status, details) from None
    except (grpc.RpcError, grpc.aio.UsageError) as exc:
        raise LinkError(Status.UNAVAILABLE, f"feed call failed: {exc!r}") from None
    finally:
        call.cancel()
