"""One JetStream atomic batch of ops: :func:`publish_batch` (nats-server 2.12 and later).

An atomic batch (the stream's ``allow_atomic``) is stored whole or not at
all, in the order it was sent, and only its last message (the commit) is
acknowledged: many ops in one round trip, where a publish per op costs one
acknowledgement each. The protocol: every message carries
``Nats-Batch-Id`` (one id per batch, at most 64 characters) and
``Nats-Batch-Sequence`` (1, 2, ...); the last also ``Nats-Batch-Commit: 1``
and is sent as a request, whose reply is the publish acknowledgement with
``batch`` and ``count``, or an error naming why the whole batch was refused.

What the server enforces, and the exporter relies on:

- at most 1000 messages a batch by default (the server's ``max_batch_size``;
  error :data:`TOO_LARGE`), 50 batches in flight per stream, a batch idle
  for 10 s abandoned (never stored);
- ``Nats-Msg-Id`` deduplication applies: a batch holding any id already in
  the duplicate window is refused whole (:data:`DUPLICATE`), so a
  re-published batch is never stored twice, nor in part.

Every message but the commit is written straight into the client's write
buffer as a ready protocol frame (:func:`~syncfw.cloud.export_subjects.op_frame`):
nats-py's ``publish`` spends several times longer building each message's
headers than the rest of the export does with it. The commit goes through
nats-py's ``request``, behind them on the same connection.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from syncfw.cloud.export_subjects import H_BATCH_ID, H_BATCH_SEQ, op_frame, op_message
from syncfw.store.follow import FeedItem

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = [
    "DUPLICATE",
    "NOT_ENABLED",
    "TOO_LARGE",
    "BatchAck",
    "BatchRefused",
    "can_write_frames",
    "publish_batch",
]

H_BATCH_COMMIT = "Nats-Batch-Commit"

NOT_ENABLED = 10174
"""The stream does not allow atomic batch publish."""
TOO_LARGE = 10199
"""The batch holds more messages than the server's ``max_batch_size``."""
DUPLICATE = 10201
"""The batch holds a message id already in the stream's duplicate window."""


class BatchRefused(Exception):
    """The server refused the whole batch (nothing of it stored): ``code`` says why."""

    def __init__(self, code: int | None, description: str) -> None:
        super().__init__(f"atomic batch refused ({code}): {description}")
        self.code = code
        self.description = description


@dataclass(frozen=True, slots=True)
class BatchAck:
    """The acknowledgement of a stored batch: its last stream sequence and size."""

    stream: str
    seq: int
    count: int


def can_write_frames(nc: Client) -> bool:
    """Whether this nats-py client has the write buffer :func:`publish_batch` uses."""
    return callable(getattr(nc, "_send_command", None))


async def publish_batch(
    nc: Client,
    stream: str,
    prefix: str,
    fleet: str,
    items: Sequence[FeedItem],
    timeout_s: float,
) -> BatchAck:
    """Publish ``items`` (in order; at most the server's batch size) as one atomic batch.

    Returns:
        The acknowledgement, checked: the stream is ``stream`` and it stored
        exactly ``len(items)`` messages.

    Raises:
        BatchRefused: the server refused the batch (nothing of it is stored).
        nats.errors.TimeoutError: no acknowledgement within ``timeout_s``
            (the batch may or may not be stored: publish it again, its
            message ids keep it from being stored twice).
        ValueError: ``items`` is empty.
        Exception: any other error of the client (connection lost...).
    """
    if not items:
        raise ValueError("an atomic batch holds at least one op")
    bid = uuid.uuid4().hex
    n = len(items)
    if n > 1:
        frames = b"".join(
            op_frame(prefix, fleet, it.op, rejected=it.rejected, batch=(bid, i))
            for i, it in enumerate(items[:-1], 1)
        )
        # nats-py's own write buffer, so the commit below follows these frames.
        await nc._send_command(frames)
    last = items[-1]
    subject, body, headers = op_message(prefix, fleet, last.op, rejected=last.rejected)
    headers[H_BATCH_ID] = bid
    headers[H_BATCH_SEQ] = str(n)
    headers[H_BATCH_COMMIT] = "1"
    reply = await nc.request(subject, body, headers=headers, timeout=timeout_s)
    return _ack(reply.data, stream, n)


def _ack(data: bytes, stream: str, n: int) -> BatchAck:
    try:
        doc: Any = json.loads(data)
    except ValueError:
        raise BatchRefused(None, f"not a publish acknowledgement: {data[:200]!r}") from None
    if not isinstance(doc, dict):
        raise BatchRefused(None, f"not a publish acknowledgement: {data[:200]!r}")
    err = doc.get("error")
    if err is not None:
        code = err.get("err_code") if isinstance(err, dict) else None
        desc = err.get("description", str(err)) if isinstance(err, dict) else str(err)
        raise BatchRefused(code if isinstance(code, int) else None, str(desc))
    if doc.get("stream") != stream or doc.get("count") != n:
        # A server that ignores the batch headers stores each message alone and
        # acknowledges the last as an ordinary publish: the rest went unchecked.
        raise BatchRefused(
            None,
            f"acknowledged as {doc.get('count')!r} messages of stream {doc.get('stream')!r}, "
            f"not a batch of {n} in {stream!r}",
        )
    return BatchAck(stream=stream, seq=int(doc.get("seq", 0)), count=n)
