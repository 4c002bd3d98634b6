"""Frames to protobuf bytes and back: the one wire form every transport carries.

Invariants:

1. ``decode_frame(encode_frame(f)) == f`` for every well-formed frame.
2. :func:`decode_frame` raises only :class:`DecodeError`, for anything that is
   not exactly one well-formed frame of this protocol (protobuf errors never leak).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf.message import DecodeError as _PbDecodeError

from syncfw.errors import DecodeError
from syncfw.sync.frames import (
    Ack,
    Close,
    Digest,
    Frame,
    Hello,
    Ops,
    PeerInfo,
    Peers,
    Status,
    Summary,
)
from syncfw.transport._pb import sync_pb2 as pb

__all__ = ["MAX_FRAME_BYTES", "decode_frame", "encode_frame", "frame_to_pb", "pb_to_frame"]

MAX_FRAME_BYTES = 8 * 1024 * 1024
"""No frame may be larger, whatever the negotiated batch cap (gRPC max message size)."""


def _vv_entries(vv: Mapping[str, int]) -> list[pb.VvEntry]:
    return [pb.VvEntry(origin=o, seq=s) for o, s in sorted(vv.items())]


def _vv_from(entries: Iterable[pb.VvEntry]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries:
        if not e.origin or e.origin in out:
            raise DecodeError("version vector with an empty or repeated origin")
        out[e.origin] = int(e.seq)
    return out


def frame_to_pb(frame: Frame) -> pb.Frame:
    """The protobuf message for ``frame``."""
    if isinstance(frame, Hello):
        return pb.Frame(
            hello=pb.Hello(
                protocol=frame.protocol,
                fleet_id=frame.fleet_id,
                node_id=frame.node_id,
                hlc=frame.hlc,
                features=list(frame.features),
                max_batch_bytes=frame.max_batch_bytes,
            )
        )
    if isinstance(frame, Digest):
        return pb.Frame(digest=pb.Digest(vv_digest=frame.digest))
    if isinstance(frame, Summary):
        return pb.Frame(
            summary=pb.Summary(
                vv=_vv_entries(frame.vv), base_digest=frame.base_digest, want_full=frame.want_full
            )
        )
    if isinstance(frame, Ops):
        return pb.Frame(ops=pb.Ops(batch=frame.batch, last=frame.last))
    if isinstance(frame, Ack):
        return pb.Frame(ack=pb.Ack(vv=_vv_entries(frame.vv)))
    if isinstance(frame, Peers):
        return pb.Frame(
            peers=pb.Peers(
                peers=[
                    pb.Peer(node_id=p.node_id, address=p.address, heartbeat=p.heartbeat)
                    for p in frame.peers
                ]
            )
        )
    if isinstance(frame, Close):
        return pb.Frame(close=pb.Close(code=int(frame.code), reason=frame.reason))
    raise TypeError(f"not a frame: {frame!r}")


def pb_to_frame(msg: pb.Frame) -> Frame:
    """The frame a protobuf message carries.

    Raises:
        DecodeError: an empty frame, or a field out of range.
    """
    kind = msg.WhichOneof("body")
    if kind == "hello":
        h = msg.hello
        return Hello(
            protocol=h.protocol,
            fleet_id=h.fleet_id,
            node_id=h.node_id,
            hlc=h.hlc,
            features=tuple(h.features),
            max_batch_bytes=h.max_batch_bytes,
        )
    if kind == "digest":
        if len(msg.digest.vv_digest) != 16:
            raise DecodeError("a digest is 16 bytes")
        return Digest(msg.digest.vv_digest)
    if kind == "summary":
        base = msg.summary.base_digest
        if base and len(base) != 16:
            raise DecodeError("a summary's base digest is 16 bytes")
        return Summary(_vv_from(msg.summary.vv), base, msg.summary.want_full)
    if kind == "ops":
        return Ops(batch=msg.ops.batch, last=msg.ops.last)
    if kind == "ack":
        return Ack(_vv_from(msg.ack.vv))
    if kind == "peers":
        return Peers(
            tuple(
                PeerInfo(node_id=p.node_id, address=p.address, heartbeat=p.heartbeat)
                for p in msg.peers.peers
            )
        )
    if kind == "close":
        try:
            code = Status(msg.close.code)
        except ValueError:
            code = Status.INTERNAL
        return Close(code, msg.close.reason[:1000])
    raise DecodeError("empty frame")


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of ``frame``."""
    return frame_to_pb(frame).SerializeToString()


def decode_frame(data: bytes) -> Frame:
    """Parse wire bytes into a frame.

    Raises:
        DecodeError: the bytes are not one well-formed frame, or exceed
            :data:`MAX_FRAME_BYTES`.
    """
    if len(data) > MAX_FRAME_BYTES:
        raise DecodeError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        msg = pb.Frame.FromString(data)
    except _PbDecodeError as exc:
        raise DecodeError(f"malformed frame: {exc}") from None
    return pb_to_frame(msg)
