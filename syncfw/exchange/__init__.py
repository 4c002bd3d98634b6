"""The one performer: carries out a sync session's effects against a replica.

Owns the :class:`~syncfw.exchange.performer.Performer` (one error policy for
every effect, ``performer``), the async runner that joins a performer to a
transport's byte stream and encodes and decodes its frames (``runner``:
:func:`run_exchange`, :class:`ExchangeOutcome`, :class:`SendBudget`), and
:class:`SessionPair`, which drives two sessions without an event loop in tests
(``pair``). The gRPC mesh, the simulator and the test pair all use the one
performer, so the simulator exercises the very failure paths the real mesh runs.

May import: errors, metrics, log, codec, sync, transport.base, transport.wire
(the wire form of frames). Must not import: store, node, mesh, grpc.
"""

from syncfw.exchange.pair import PairResult, SessionPair, drive
from syncfw.exchange.performer import Link, Performer
from syncfw.exchange.runner import ExchangeOutcome, ExchangeRunner, SendBudget, run_exchange

__all__ = [
    "ExchangeOutcome",
    "ExchangeRunner",
    "Link",
    "PairResult",
    "Performer",
    "SendBudget",
    "SessionPair",
    "drive",
    "run_exchange",
]
