"""Bytes between nodes: gRPC (grpc.aio) and an in-memory transport.

Owns the byte stream every transport offers (``base``: :class:`FrameStream`,
:class:`LinkError`), the wire form of sync frames (``wire``: protobuf,
generated from ``protos/`` into ``_pb``; the exchange runner calls it, once per
frame), the gRPC server and pooled client channels (``rpc``), the in-memory
transport that carries the very same bytes (``memory``) and the listen-and-dial
adapters the mesh runs on (``network``). Transports never parse what they carry
and hold no protocol logic; :mod:`syncfw.exchange` performs the sessions.

This is the only package that imports ``grpc``; grpc exceptions are translated
here into :mod:`syncfw.errors` and never leak. May import: errors, log, codec,
sync. Must not import: store, exchange, node, mesh.
"""
