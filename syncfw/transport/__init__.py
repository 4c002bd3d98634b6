"""Bytes between nodes: gRPC (grpc.aio) and an in-memory transport.

Owns the wire form of sync frames (protobuf, generated from ``protos/`` into
``_pb``), the gRPC server and pooled client channels, the in-memory transport
that carries the very same frame bytes, and the async exchange runner that
performs a :mod:`syncfw.sync` session's effects against a
:class:`~syncfw.log.Replica`.

This is the only package that imports ``grpc``; grpc exceptions are translated
here into :mod:`syncfw.errors` and never leak. May import: errors, log, codec,
sync. Must not import: store, node, mesh.
"""
