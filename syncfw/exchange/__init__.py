"""The one performer: carries out a sync session's effects against a replica.

Owns the :class:`~syncfw.exchange.performer.Performer` (one error policy for
every effect), the async runner that joins a performer to a transport's frame
stream, and :class:`SessionPair`, which drives two sessions without an event
loop in tests. The gRPC mesh, the simulator and the test pair all use it, so
the simulator exercises the very failure paths the real mesh runs.

May import: errors, metrics, log, codec, sync, transport.base. Must not
import: store, node, mesh, grpc.
"""
