"""``syncfw.v1.Artifacts/Fetch`` on gRPC: the server side and the pooled client call.

The same server, channel pool and mTLS identity rules as ``syncfw.v1.Sync``
(:mod:`syncfw.transport.rpc`); see :mod:`syncfw.transport.artifacts` for what a
fetch is. Calls are admitted against the transport's quotas (an admission book
of their own, so chunk transfer never takes the slots sync needs) and cut at
``exchange_timeout_s``; a handler bug is ``INTERNAL`` to the peer and logged here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio

from syncfw.metrics import NodeMetrics
from syncfw.notices import Notices, clip, clip_text
from syncfw.sync.frames import Status
from syncfw.transport._pb import artifacts_pb2
from syncfw.transport.admission import Admission, Refusal, peer_host
from syncfw.transport.artifacts import (
    ArtifactSlot,
    ChunkPiece,
    ChunkRequest,
    check_hashes,
    check_piece,
)
from syncfw.transport.base import LinkError
from syncfw.transport.config import TransportConfig
from syncfw.transport.front import source_of

__all__ = ["SERVICE", "artifact_service", "grpc_fetch"]

log = logging.getLogger("syncfw.transport")

SERVICE = "syncfw.v1.Artifacts"
_FETCH = f"/{SERVICE}/Fetch"


def _status_of(code: grpc.StatusCode | None) -> Status:
    if code is None:
        return Status.UNAVAILABLE
    try:
        return Status(code.value[0])
    except ValueError:
        return Status.INTERNAL


def _identity(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    names = list(context.auth_context().get("x509_common_name") or [])
    return names[0].decode("utf-8", "replace") if names else None


class _ArtifactServicer:
    def __init__(
        self, slot: ArtifactSlot, config: TransportConfig, metrics: NodeMetrics | None
    ) -> None:
        self._slot = slot
        self._config = config
        self._metrics = metrics
        self.admission = Admission(config.quotas())
        self.refusals = Notices(log, config.refusal_log_interval_s, max_keys=1024)

    def _refused(self, peer: str, reason: str, detail: str) -> None:
        self.refusals.warn(
            f"{peer_host(peer)}|{reason}",
            1,
            "refused a fetch from %s (%s): %s",
            clip(peer),
            reason,
            detail,
        )
        if self._metrics is not None:
            self._metrics.refused_streams.labels(self._metrics.node_id, reason).inc()

    async def Fetch(
        self, request: artifacts_pb2.FetchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[artifacts_pb2.ChunkPiece]:
        peer, identity = source_of(context.peer()), _identity(context)
        handler = self._slot.handler
        if handler is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this node serves no artifacts")
            return
        try:
            hashes = check_hashes(list(request.hashes))
        except LinkError as exc:
            self._refused(peer, "bad_fetch", exc.reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.reason)
            return
        ticket = self.admission.admit(peer, identity)
        if isinstance(ticket, Refusal):
            self._refused(peer, ticket.value, "too many fetches at once")
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"too many fetches at once ({ticket.value})"
            )
            return
        req = ChunkRequest(
            hashes, identity or clip_text(request.node_id), peer, authenticated=identity is not None
        )
        try:
            async with asyncio.timeout(self._config.exchange_timeout_s):
                async for piece in handler(req):
                    yield artifacts_pb2.ChunkPiece(
                        hash=piece.digest,
                        offset=piece.offset,
                        data=piece.data,
                        last=piece.last,
                        missing=piece.missing,
                    )
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"fetch took over {self._config.exchange_timeout_s}s",
            )
        except LinkError as exc:  # the handler's own refusal
            await context.abort(grpc.StatusCode[exc.status.name], exc.reason[:1000])
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception:  # never let a handler bug leak a traceback to the peer
            log.exception("artifact handler failed for %s", peer)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        finally:
            self.admission.release(ticket)


def artifact_service(
    slot: ArtifactSlot, config: TransportConfig, metrics: NodeMetrics | None = None
) -> grpc.GenericRpcHandler[Any, Any]:
    """``syncfw.v1.Artifacts``, served from ``slot`` (beside ``syncfw.v1.Sync``)."""
    servicer = _ArtifactServicer(slot, config, metrics)
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Fetch": grpc.unary_stream_rpc_method_handler(
                servicer.Fetch,
                request_deserializer=artifacts_pb2.FetchRequest.FromString,
                response_serializer=artifacts_pb2.ChunkPiece.SerializeToString,
            )
        },
    )


async def grpc_fetch(
    channel: grpc.aio.Channel,
    address: str,
    hashes: Sequence[bytes],
    *,
    node_id: str,
    timeout_s: float,
) -> AsyncIterator[ChunkPiece]:
    """``Fetch`` on ``channel`` (the pooled one to ``address``): the pieces, checked.

    Raises:
        LinkError: the call failed or ended non-OK (with the peer's status), or a
            piece broke the bounds (``INVALID_ARGUMENT``).
    """
    wanted = check_hashes(hashes)
    method: Any = channel.unary_stream(
        _FETCH,
        request_serializer=artifacts_pb2.FetchRequest.SerializeToString,
        response_deserializer=artifacts_pb2.ChunkPiece.FromString,
    )
    call = method(artifacts_pb2.FetchRequest(node_id=node_id, hashes=wanted), timeout=timeout_s)
    try:
        async for msg in call:
            yield check_piece(ChunkPiece(msg.hash, msg.offset, msg.data, msg.last, msg.missing))
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
            raise LinkError(Status.FAILED_PRECONDITION, f"{address} serves no artifacts") from None
        detail = exc.details() or exc.code().name
        if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
            # a busy refusal names who took the chunk: kept whole (bounded, printable)
            shown = "".join(c if c.isprintable() else "?" for c in clip_text(detail, 1000))
        else:
            shown = clip(detail)
        raise LinkError(_status_of(exc.code()), f"{address}: {shown}") from None
    except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
        raise LinkError(Status.ABORTED, f"{address}: fetch failed: {exc!r}") from None
    finally:
        call.cancel()
