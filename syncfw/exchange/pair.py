"""Two sessions joined by a fake link, driven without an event loop (tests, benchmarks).

:class:`SessionPair` runs each side's effects through the one
:class:`~syncfw.exchange.performer.Performer`, stepping its coroutines by hand
(:func:`drive`): that works for a replica whose coroutines never suspend (such
as :class:`syncfw.testing.memory.MemoryReplica`); a replica that really awaits
I/O needs the async runner in :mod:`syncfw.exchange.runner` instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from syncfw.exchange.performer import Performer
from syncfw.exchange.runner import peer_book, replica_wall_ms
from syncfw.log import Replica
from syncfw.sync import Frame, PeerInfo, Session, SessionConfig, SessionState, Status

__all__ = ["PairResult", "SessionPair", "drive"]

T = TypeVar("T")


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends and return its result.

    Raises:
        RuntimeError: the coroutine suspended (it needs an event loop).
    """
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("the replica suspended; drive it with the async runner instead")


@dataclass(slots=True)
class PairResult:
    """How a paired exchange went.

    Attributes:
        a: the initiator's end status and reason.
        b: the responder's end status and reason.
        frames: frames delivered, both directions.
        wire_bytes: bytes delivered, when the pair encodes frames.
        rounds: lockstep delivery rounds (a round trip is two rounds).
        learned: peer lists each side learned, by side.
    """

    a: tuple[Status, str] | None = None
    b: tuple[Status, str] | None = None
    frames: int = 0
    wire_bytes: int = 0
    rounds: int = 0
    learned: dict[str, list[Any]] = field(default_factory=lambda: {"a": [], "b": []})

    @property
    def round_trips(self) -> int:
        """Round trips the exchange took, the initiator speaking first."""
        return (self.rounds + 1) // 2


class _Outbox:
    """A side's link: frames wait in the pair's outbox for the next round."""

    __slots__ = ("pair", "side")

    def __init__(self, pair: SessionPair, side: str) -> None:
        self.pair = pair
        self.side = side

    async def send(self, frame: Frame) -> int:
        self.pair.outbox[self.side].append(frame)
        return 0  # bytes are counted on delivery, where the pair encodes


class SessionPair:
    """Connects two replicas' sessions with an in-process, lockstep link.

    Args:
        a: the initiating replica.
        b: the responding replica; its session starts on the first frame it gets.
        config_a: session tunables of ``a``.
        config_b: session tunables of ``b``.
        encode: turns a frame into wire bytes (e.g. the transport's protobuf);
            when given with ``decode``, every frame crosses the link as bytes.
        decode: turns wire bytes back into a frame.
        tamper: called on each frame in flight with its sender ("a" or "b");
            returns the frame to deliver (tests inject faults with it).
    """

    def __init__(
        self,
        a: Replica,
        b: Replica,
        *,
        config_a: SessionConfig | None = None,
        config_b: SessionConfig | None = None,
        encode: Callable[[Frame], bytes] | None = None,
        decode: Callable[[bytes], Frame] | None = None,
        tamper: Callable[[str, Frame], Frame | None] | None = None,
    ) -> None:
        self.replicas = {"a": a, "b": b}
        self.sessions = {
            side: Session(
                r.node_id,
                r.fleet_id,
                config=cfg,
                wall_ms=replica_wall_ms(r),
                fleet_digest=r.fleet_digest,
                book=peer_book(r),
                initiator=side == "a",
            )
            for side, r, cfg in (("a", a, config_a), ("b", b, config_b))
        }
        self._encode = encode
        self._decode = decode
        self._tamper = tamper
        self.outbox: dict[str, list[Frame]] = {"a": [], "b": []}
        self.result = PairResult()
        self.performers = {
            side: Performer(
                self.sessions[side],
                self.replicas[side],
                _Outbox(self, side),
                on_peers=functools.partial(self._learned, side),
                on_end=functools.partial(self._ended, side),
            )
            for side in ("a", "b")
        }

    def run(self, *, cut_after: int | None = None, max_rounds: int = 100_000) -> PairResult:
        """Run the exchange to its end (or until ``cut_after`` frames were delivered).

        A cut aborts both sessions with ``ABORTED`` mid-flight, as a dropped
        connection would.
        """
        res = self.result
        self._start("a")
        while not (self.sessions["a"].ended and self.sessions["b"].ended):
            if res.rounds >= max_rounds:
                raise RuntimeError("exchange did not end")
            flights = {side: self.outbox[side] for side in ("a", "b")}
            self.outbox = {"a": [], "b": []}
            if not flights["a"] and not flights["b"]:
                for side in ("a", "b"):  # nothing in flight: the link is idle, both hang up
                    self._abort(side, "link idle")
                break
            res.rounds += 1
            for sender, frames in flights.items():
                receiver = "b" if sender == "a" else "a"
                for frame in frames:
                    if cut_after is not None and res.frames >= cut_after:
                        for side in ("a", "b"):
                            self._abort(side, "cut")
                        return res
                    delivered = self._carry(sender, frame)
                    if delivered is None:
                        continue
                    res.frames += 1
                    if receiver == "b" and self.sessions["b"].state is SessionState.IDLE:
                        self._start("b")
                    drive(self.performers[receiver].receive(delivered))
        return res

    def _carry(self, sender: str, frame: Frame) -> Frame | None:
        if self._tamper is not None:
            tampered = self._tamper(sender, frame)
            if tampered is None:
                return None
            frame = tampered
        if self._encode is not None and self._decode is not None:
            data = self._encode(frame)
            self.result.wire_bytes += len(data)
            return self._decode(data)
        return frame

    def _start(self, side: str) -> None:
        drive(self.performers[side].start())

    def _abort(self, side: str, reason: str) -> None:
        drive(self.performers[side].abort(Status.ABORTED, reason))

    def _ended(self, side: str, status: Status, reason: str) -> None:
        setattr(self.result, side, (status, reason))

    def _learned(self, side: str, peers: tuple[PeerInfo, ...]) -> None:
        self.result.learned[side].append(peers)
