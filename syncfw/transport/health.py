"""The gRPC health service (``grpc.health.v1.Health``) and a client check of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from syncfw.transport._pb import health_pb2, health_pb2_grpc

__all__ = ["SERVICE", "HealthServicer", "check_health"]

SERVICE = "syncfw.v1.Sync"


class HealthServicer(health_pb2_grpc.HealthServicer):
    """SERVING for the server and ``syncfw.v1.Sync`` until :meth:`set` says otherwise."""

    def __init__(self) -> None:
        self.statuses: dict[str, int] = {
            "": health_pb2.HealthCheckResponse.SERVING,
            SERVICE: health_pb2.HealthCheckResponse.SERVING,
        }
        self.changed = asyncio.Event()

    def set(self, status: int) -> None:
        """Report ``status`` for every service and wake watchers."""
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
