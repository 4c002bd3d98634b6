"""Read an exported stream back and check it against a log: every op once, in order.

For the tests, the benchmark and the demo's verified summary.
:func:`read_stream` reads every message of the stream in stream order with
an ephemeral ordered pull (nothing is left behind on the server);
:func:`check_stream` says what is missing, duplicated or out of order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import nats
import nats.errors
from nats.js import api

from syncfw.cloud.export_subjects import ExportedOp, op_from_message

__all__ = ["StreamReport", "check_stream", "read_stream"]

log = logging.getLogger("syncfw.cloud")


async def read_stream(
    servers: Sequence[str],
    stream: str,
    *,
    batch: int = 1000,
    timeout_s: float = 5.0,
    settle_s: float = 30.0,
) -> list[ExportedOp]:
    """Every op message of ``stream``, in stream order.

    Creating the reading consumer is retried for up to ``settle_s`` when it times
    out (with a WARNING each time): just after a cluster's servers restart, its
    JetStream leader may still be elected and answers no API request until then.
    """
    nc = await nats.connect(servers=list(servers), connect_timeout=2, max_reconnect_attempts=3)
    try:
        js = nc.jetstream(timeout=timeout_s)
        info = await js.stream_info(stream)
        total = info.state.messages
        out: list[ExportedOp] = []
        if not total:
            return out
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        give_up = time.monotonic() + settle_s
        while True:
            try:
                sub = await js.pull_subscribe("", stream=stream, config=config)
                break
            except nats.errors.TimeoutError:
                if time.monotonic() >= give_up:
                    raise
                log.warning("reading stream %s: no answer to creating a consumer; retrying", stream)
                await asyncio.sleep(0.5)
        try:
            while len(out) < total:
                msgs = await sub.fetch(min(batch, total - len(out)), timeout=timeout_s)
                for m in msgs:
                    out.append(op_from_message(dict(m.headers or {}), m.data))
        finally:
            await sub.unsubscribe()
        return out
    finally:
        await nc.close()


@dataclass(slots=True)
class StreamReport:
    """What :func:`check_stream` found."""

    messages: int = 0
    duplicates: list[tuple[str, int]] = field(default_factory=list)
    missing: dict[str, list[int]] = field(default_factory=dict)
    out_of_order: list[tuple[str, int, int]] = field(default_factory=list)
    extra: dict[str, list[int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every op of the log exactly once, each origin in seq order."""
        return not (self.duplicates or self.missing or self.out_of_order or self.extra)

    def __str__(self) -> str:
        if self.ok:
            return f"{self.messages} messages: every op exactly once, in per-origin order"
        return (
            f"{self.messages} messages: duplicates {self.duplicates[:10]}, missing "
            f"{ {o: s[:10] for o, s in self.missing.items()} }, out of order "
            f"{self.out_of_order[:10]}, beyond the log { {o: s[:10] for o, s in self.extra.items()} }"
        )


def check_stream(ops: Sequence[ExportedOp], vv: Mapping[str, int]) -> StreamReport:
    """Compare the stream's ops with a log's version vector ``vv``."""
    rep = StreamReport(messages=len(ops))
    seen: set[tuple[str, int]] = set()
    last: dict[str, int] = {}
    for e in ops:
        o, s = e.op.origin, e.op.seq
        if (o, s) in seen:
            rep.duplicates.append((o, s))
            continue
        seen.add((o, s))
        if s < last.get(o, 0):
            rep.out_of_order.append((o, last[o], s))
        last[o] = max(last.get(o, 0), s)
        if s > vv.get(o, 0):
            rep.extra.setdefault(o, []).append(s)
    for o, head in vv.items():
        miss = [s for s in range(1, head + 1) if (o, s) not in seen]
        if miss:
            rep.missing[o] = miss
    return rep
