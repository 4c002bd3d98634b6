"""How an op becomes a JetStream message, and back: subjects, message ids, headers.

Pure: no I/O, no NATS import. The exporter (:mod:`syncfw.cloud.export`)
encodes with :func:`op_message`; a consumer decodes with :func:`op_from_message`
(``examples/jetstream_consumer.py`` rebuilds a replica with it).

The mapping (documented in the README, "Export to NATS JetStream"):

- **Subject**: ``<prefix>.<fleet>.<zone tokens>``. The op's zone (a key
  prefix such as ``results/t7/``) is split on ``/`` (a trailing ``/`` ends
  the zone and adds no token); each part becomes one subject token with
  every byte outside ``[A-Za-z0-9_-]`` written ``%XX`` (its UTF-8 bytes in
  upper-case hex), so ``.``, ``*``, ``>``, spaces and control characters can
  never act as separators or wildcards. An empty part (``a//b/``) is the
  token ``%``, which no encoded part can be; a zone that does not end in
  ``/`` (``site/line-``) has a lone ``%`` after its last token
  (``site.line-%``), so it never shares a subject with ``site/line-/``. A consumer
  filters by zone with ``<prefix>.<fleet>.results.t7`` or
  ``<prefix>.<fleet>.results.>``.
- **Message id** (``Nats-Msg-Id``): ``origin:seq``, so JetStream's duplicate
  window drops a re-delivery of the same op.
- **Body**: the op's payload bytes exactly as the log holds them (msgpack,
  meaning set by the kind; :func:`syncfw.store.follow.decode_payload` decodes it).
- **Headers** (all ASCII): ``Syncfw-Origin``, ``Syncfw-Seq``, ``Syncfw-Hlc``
  (decimal), ``Syncfw-Kind``, ``Syncfw-Key`` and ``Syncfw-Zone`` (percent-
  encoded UTF-8, ``/`` kept), ``Syncfw-Epoch``, ``Syncfw-Prev`` (hex of the
  chain hash), ``Syncfw-Sig`` (hex; absent when unsigned), ``Syncfw-Rejected:
  1`` for ops the aggregator holds as rejected.

Invariants:

1. Injective: two different zones never share a subject, and
   :func:`op_from_message` returns exactly the op :func:`op_message` was given.
2. Every subject is a valid NATS subject with no wildcard token.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from syncfw.log import Op

__all__ = [
    "ExportedOp",
    "MessageFormatError",
    "msg_id",
    "op_frame",
    "op_from_message",
    "op_message",
    "subject_token",
    "zone_subject",
]

_SAFE = re.compile(rb"[A-Za-z0-9_-]")
_EMPTY = "%"
H_ORIGIN = "Syncfw-Origin"
H_SEQ = "Syncfw-Seq"
H_HLC = "Syncfw-Hlc"
H_KIND = "Syncfw-Kind"
H_KEY = "Syncfw-Key"
H_ZONE = "Syncfw-Zone"
H_EPOCH = "Syncfw-Epoch"
H_PREV = "Syncfw-Prev"
H_SIG = "Syncfw-Sig"
H_REJECTED = "Syncfw-Rejected"
H_MSG_ID = "Nats-Msg-Id"
H_BATCH_ID = "Nats-Batch-Id"
H_BATCH_SEQ = "Nats-Batch-Sequence"


class MessageFormatError(ValueError):
    """A JetStream message that is not an op exported by syncfw (names what is wrong)."""


def subject_token(part: str) -> str:
    """One subject token for ``part`` (see the module: ``%XX`` escapes, ``%`` if empty)."""
    if not part:
        return _EMPTY
    out = []
    for b in part.encode("utf-8"):
        c = bytes((b,))
        out.append(c.decode() if _SAFE.fullmatch(c) else f"%{b:02X}")
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def zone_subject(prefix: str, fleet: str, zone: str) -> str:
    """The subject of every op of ``zone`` (see the module; remembered, as a
    fleet has few zones and every op of one shares it)."""
    if zone.endswith("/"):
        tokens = [subject_token(p) for p in zone[:-1].split("/")]
    else:  # a zone that is no whole path segment: its last token ends in a lone %
        tokens = [subject_token(p) for p in zone.split("/")]
        tokens[-1] += _EMPTY
    return ".".join([prefix, subject_token(fleet), *tokens])


def msg_id(origin: str, seq: int) -> str:
    """``origin:seq``: JetStream's ``Nats-Msg-Id`` for an op."""
    return f"{origin}:{seq}"


# What ``quote(s, safe="/")`` leaves as it is: such text needs no call.
_QUOTE_SAFE = re.compile(r"[A-Za-z0-9_.~/-]*")


def _text(s: str) -> str:
    return s if _QUOTE_SAFE.fullmatch(s) else quote(s, safe="/")


_cached_text = functools.lru_cache(maxsize=4096)(_text)  # origins, kinds, zones: few


def _headers(op: Op, rejected: bool) -> dict[str, str]:
    headers = {
        H_MSG_ID: msg_id(op.origin, op.seq),
        H_ORIGIN: _cached_text(op.origin),
        H_SEQ: str(op.seq),
        H_HLC: str(op.hlc),
        H_KIND: _cached_text(op.kind),
        H_KEY: _text(op.key),
        H_ZONE: _cached_text(op.zone),
        H_EPOCH: str(op.epoch),
        H_PREV: op.prev.hex(),
    }
    if op.sig is not None:
        headers[H_SIG] = op.sig.hex()
    if rejected:
        headers[H_REJECTED] = "1"
    return headers


def op_message(
    prefix: str, fleet: str, op: Op, *, rejected: bool = False
) -> tuple[str, bytes, dict[str, str]]:
    """``(subject, body, headers)`` of ``op`` (see the module for the format)."""
    return zone_subject(prefix, fleet, op.zone), op.value, _headers(op, rejected)


def op_frame(
    prefix: str,
    fleet: str,
    op: Op,
    *,
    rejected: bool = False,
    batch: tuple[str, int] | None = None,
) -> bytes:
    """The NATS protocol frame (``HPUB``, no reply subject) publishing ``op``:
    the message of :func:`op_message` (the same headers, in the same order:
    a test holds them equal), as bytes for the client's write buffer.

    Args:
        batch: ``(batch id, sequence)``: the frame is that message of an
            atomic batch (``Nats-Batch-Id``, ``Nats-Batch-Sequence``).

    Raises:
        MessageFormatError: a header would carry a CR, an LF or a non-ASCII
            character (no op of a valid origin has one: every text is %-encoded).
    """
    # One f-string rather than the headers dict of op_message: this runs per op
    # on the export's hot path.
    head = (
        f"NATS/1.0\r\n{H_MSG_ID}: {op.origin}:{op.seq}\r\n"
        f"{H_ORIGIN}: {_cached_text(op.origin)}\r\n{H_SEQ}: {op.seq}\r\n"
        f"{H_HLC}: {op.hlc}\r\n{H_KIND}: {_cached_text(op.kind)}\r\n"
        f"{H_KEY}: {_text(op.key)}\r\n{H_ZONE}: {_cached_text(op.zone)}\r\n"
        f"{H_EPOCH}: {op.epoch}\r\n{H_PREV}: {op.prev.hex()}\r\n"
    )
    lines = 10
    if op.sig is not None:
        head += f"{H_SIG}: {op.sig.hex()}\r\n"
        lines += 1
    if rejected:
        head += f"{H_REJECTED}: 1\r\n"
        lines += 1
    if batch is not None:
        head += f"{H_BATCH_ID}: {batch[0]}\r\n{H_BATCH_SEQ}: {batch[1]}\r\n"
        lines += 2
    head += "\r\n"
    if not head.isascii() or head.count("\n") != lines + 1 or head.count("\r") != lines + 1:
        raise MessageFormatError(f"op {op.origin!r}:{op.seq} has a header NATS cannot carry")
    hdr = head.encode("ascii")
    subject = zone_subject(prefix, fleet, op.zone).encode("ascii")
    body = op.value
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject, len(hdr), len(hdr) + len(body), hdr, body)


@dataclass(frozen=True, slots=True)
class ExportedOp:
    """An op read back from the stream, and whether the aggregator held it as rejected."""

    op: Op
    rejected: bool


def op_from_message(headers: dict[str, str] | None, body: bytes) -> ExportedOp:
    """The op a message carries (the inverse of :func:`op_message`).

    Raises:
        MessageFormatError: a header is missing or malformed, or the message
            id does not match the origin and seq.
    """
    h = headers or {}
    try:
        origin = unquote(h[H_ORIGIN], errors="strict")
        seq = int(h[H_SEQ])
        op = Op(
            origin=origin,
            seq=seq,
            hlc=int(h[H_HLC]),
            zone=unquote(h[H_ZONE], errors="strict"),
            epoch=int(h[H_EPOCH]),
            key=unquote(h[H_KEY], errors="strict"),
            kind=unquote(h[H_KIND], errors="strict"),
            value=bytes(body),
            prev=bytes.fromhex(h[H_PREV]),
            sig=bytes.fromhex(h[H_SIG]) if H_SIG in h else None,
        )
    except KeyError as exc:
        raise MessageFormatError(f"not a syncfw op message: header {exc.args[0]} missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageFormatError(f"not a syncfw op message: {exc}") from None
    if h.get(H_MSG_ID) not in (None, msg_id(origin, seq)):
        raise MessageFormatError(
            f"message id {h.get(H_MSG_ID)!r} does not name op {msg_id(origin, seq)!r}"
        )
    return ExportedOp(op, h.get(H_REJECTED) == "1")
