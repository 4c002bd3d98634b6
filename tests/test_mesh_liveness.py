"""Liveness after a cut: what a cut leaves behind must not slow the mesh for good.

A cut times exchanges out, and each timeout drops the link's batch size to
the floor. Under load every ack then comes slowly whatever the batch's size
(a receiver's commit, a round trip): the sizer must grow again, or the
burst's sender crawls at a floor-sized batch per ack for as long as the load
lasts (the five-process test's heal once took over 90 s this way).
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from syncfw.mesh import MemberState, Mesh, MeshConfig
from syncfw.mesh.config import GossipBounds
from syncfw.mesh.guard import GossipGuard
from syncfw.mesh.membership import Membership
from syncfw.metrics import NodeMetrics
from syncfw.sync import Status
from syncfw.sync.links import BatchSizer
from syncfw.testing import MemoryReplica, wait_until
from syncfw.transport.base import FrameStream
from syncfw.transport.memory import MemoryNetwork
from syncfw.transport.network import InMemoryNetwork

CAP = 768 * 1024


def _run(
    sizer: BatchSizer, per_batch_s: float, rate_bps: float, acks: int, squeeze: float = 1.0
) -> list[int]:
    """Batches sized by ``sizer`` over a link that costs ``per_batch_s`` plus the bytes
    at ``rate_bps``; returns the sizes asked for. ``squeeze``: a batch takes
    ``1/squeeze`` of the bytes asked for on the wire (zstd), and acks count wire bytes."""
    sizes = []
    for _ in range(acks):
        size = sizer.target(CAP)
        wire = max(1, int(size / squeeze))
        sizer.acked(wire, per_batch_s + wire / rate_bps)
        sizes.append(size)
    return sizes


@pytest.mark.parametrize(
    ("per_batch_s", "squeeze", "grown"),
    [
        (0.6, 1.0, 256 * 1024),
        (0.8, 1.0, 256 * 1024),
        (1.5, 1.0, 32 * 1024),
        # the five-process test's ops: 4x smaller on the wire, so the rate acks show
        # is a quarter of the bytes asked for (a probe held to it would never be sent)
        (0.6, 4.0, 256 * 1024),
        (1.2, 4.0, 128 * 1024),
    ],
)
def test_a_link_shrunk_by_a_cut_grows_again_when_a_cost_per_batch_slows_every_ack(
    per_batch_s: float, squeeze: float, grown: int
) -> None:
    s = BatchSizer(size=8192, floor=2048, cap=CAP)
    s.timed_out()  # the cut
    sizes = _run(s, per_batch_s, rate_bps=10e6, acks=40, squeeze=squeeze)
    # a floor-sized batch per ack would move 2 KiB per ack for as long as the load lasts
    # (slower growth past 1 s per batch: a batch is held to slow_s at the measured rate)
    assert sizes[0] == 2048
    assert max(sizes[-10:]) >= grown, sizes
    assert min(sizes[-10:]) >= grown // 4, sizes


@pytest.mark.parametrize(("per_batch_s", "rate_bps"), [(0.05, 8e3), (0.2, 48e3), (0.0, 8e3)])
def test_on_a_thin_link_no_batch_outlasts_a_couple_of_seconds(
    per_batch_s: float, rate_bps: float
) -> None:
    s = BatchSizer(size=8192, floor=2048, cap=CAP)
    sizes = _run(s, per_batch_s, rate_bps, acks=80)
    slowest = max(per_batch_s + n / rate_bps for n in sizes[5:])
    assert slowest <= 2.5, (slowest, sizes)
    # and it still fills the link: the last batches take at least a third of a second
    assert min(per_batch_s + n / rate_bps for n in sizes[-20:]) >= 0.3, sizes


def test_a_step_up_that_does_not_pay_goes_back_and_settles() -> None:
    s = BatchSizer(size=16384, floor=2048, cap=CAP)
    assert s.target(CAP) == 16384
    s.acked(16384, 1.0)  # middle band: step up by min(2, slow_s / 1.0) = 2
    assert s.probe is not None and s.target(CAP) == 32768
    s.acked(16384, 1.0)  # an ack of a batch sent before the step: no verdict
    assert s.probe is not None and s.size == 32768
    s.acked(32768, 1.9)  # twice the bytes in about twice the time: the link's rate
    assert s.probe is None and s.size == 16384 and s.settled > 0
    for _ in range(s.settled):
        s.acked(16384, 1.0)
        assert s.target(CAP) == 16384
    s.acked(16384, 1.0)  # settled long enough: step up again
    assert s.target(CAP) == 32768
    s.acked(16384, 1.9)  # a step near slow_s would be too small to tell: none
    s.probe = None
    s.size = s.sent = 16384
    s.acked(16384, 1.9)
    assert s.probe is None and s.size == 16384


def test_a_round_pays_new_dials_only_for_peers_it_dials() -> None:
    """A member already in an exchange is skipped by the round: no token, no count."""
    mb = Membership("me", "me:1", bounds=GossipBounds(require_port=False))
    from syncfw.sync.frames import PeerInfo

    mb.learn([PeerInfo("a", "a:1", 1), PeerInfo("b", "b:1", 1)], 0.0)
    metrics = NodeMetrics("me")
    guard = GossipGuard("me", GossipBounds(require_port=False), metrics)
    busy = {"a:1", "b:1"}
    before = guard.dials.available()
    choice = guard.choose(mb, 3, random.Random(1), 1.0, skip=busy)
    assert choice.chosen == [] and choice.new == 0
    assert guard.dials.available() >= before - 1e-6
    assert metrics.value("syncfw_gossip_dials_total", outcome="new") == 0


# -- a link gone black mid-exchange ---------------------------------------------------


class _Freezing(InMemoryNetwork):
    """Streams to "x" stop delivering once ``frozen`` is set (a black hole mid-exchange);
    with ``pace_s``, each frame from it after the Hello comes that long after the one before
    (a loaded peer)."""

    frozen = False
    pace_s = 0.0

    async def connect(
        self, address: str, *, source: str, timeout_s: float, expect_id: str | None = None
    ) -> FrameStream:
        stream = await super().connect(address, source=source, timeout_s=timeout_s)
        net = self

        class Frozen:
            peer_address = stream.peer_address
            peer_identity = stream.peer_identity

            async def send(self, data: bytes) -> None:
                if not net.frozen:
                    await stream.send(data)

            seen = 0

            async def recv(self) -> bytes | None:
                got = await stream.recv()
                self.seen += 1
                if net.pace_s and self.seen > 1:  # the Hello comes on time
                    await asyncio.sleep(net.pace_s)
                if net.frozen:
                    await asyncio.Event().wait()  # never set: nothing arrives any more
                return got

            async def close(self, status: Status, reason: str) -> None:
                await stream.close(status, reason)

        return Frozen()


async def test_a_peer_whose_exchange_goes_black_is_found_dead_in_seconds() -> None:
    """The exchange's own deadline (30 s here) must not hide the peer from the probes."""
    net = MemoryNetwork()
    cfg = MeshConfig.test().with_(
        interval_s=0.05, exchange_timeout_s=30.0, indirect_probes=0, dead_after_s=0.3
    )
    rx = MemoryReplica("x")
    for i in range(3000):  # a backlog: the exchange is still running when the link goes black
        rx.put(f"fleet/x/k{i}", "v" * 200)
    x = await Mesh.start(rx, listen="x", network=InMemoryNetwork(net), config=cfg, seed=2)
    freezing = _Freezing(net)
    a = await Mesh.start(
        MemoryReplica("a"), listen="a", seeds=["x"], network=freezing, config=cfg, seed=1
    )
    try:
        await wait_until(
            lambda: "x" in a._busy and a.replica.vv().get("x", 0) > 0,  # type: ignore[attr-defined]
            timeout_s=10.0,
            what="an exchange with x under way",
        )
        freezing.frozen = True
        net.unlisten("x")  # and x answers no probe
        t0 = time.monotonic()
        await wait_until(
            lambda: a.membership.members["x"].state is MemberState.DEAD,
            timeout_s=10.0,
            what="x declared dead",
        )
        took = time.monotonic() - t0
        assert "x" in a._busy  # the exchange itself has not given up (its deadline is 30 s)
        assert took < 5.0, took
    finally:
        await a.aclose()
        await x.aclose()


def test_a_member_heard_from_is_no_new_dial_and_is_probed_when_news_comes() -> None:
    """A peer whose exchanges keep failing after its Hello is a verified address."""
    from syncfw.sync.frames import PeerInfo

    mb = Membership("me", "me:1", bounds=GossipBounds(require_port=False))
    mb.learn([PeerInfo("a", "a:1", 1)], 0.0)
    a = mb.members["a:1"]
    assert mb.is_new(a)
    assert mb.probe_targets(set(), random.Random(1)) == []  # never probed while unverified
    mb.heard("a:1", "a", 1.0)  # its Hello came; the exchange then failed
    assert not mb.is_new(a)
    mb.failed("a:1", 2.0)
    mb.failed("a:1", 2.0)  # suspect (suspect_after=2), dead 10 s later
    mb.tick(13.0)
    assert a.state is MemberState.DEAD
    mb.learn([PeerInfo("a", "a:1", 5)], 14.0)  # fresher news of it: a probe decides
    assert a.recheck and a in mb.probe_targets(set(), random.Random(1))
    assert mb.choose(3, random.Random(1), 30.0, new_dials=0).chosen == [a]  # a due retry


async def test_a_loaded_peer_mid_catch_up_that_answers_no_probe_is_not_declared_dead() -> None:
    """Its frames are the evidence: a suspicion is refuted by the next one, and the
    exchange (which a death would cut) goes on."""
    net = MemoryNetwork()
    cfg = MeshConfig.test().with_(
        interval_s=0.05, exchange_timeout_s=30.0, indirect_probes=0, dead_after_s=0.3
    )
    rx = MemoryReplica("x")
    # 1.6 MB: at least 8 batches from an 8 KiB start, so the catch-up outlasts the
    # 3 s below however late this test's first look at it comes
    for i in range(8000):
        rx.put(f"fleet/x/k{i}", "v" * 200)
    x = await Mesh.start(rx, listen="x", network=InMemoryNetwork(net), config=cfg, seed=2)
    slow = _Freezing(net)
    # a frame every 0.5 s after the Hello: past probe_timeout_s + interval_s (0.35 s),
    # within the window with dead_after_s (0.65 s). Paced from the outset, the exchange
    # cannot finish before the pace applies (on a loaded machine it did).
    slow.pace_s = 0.5
    a = await Mesh.start(
        MemoryReplica("a"), listen="a", seeds=["x"], network=slow, config=cfg, seed=1
    )
    try:
        await wait_until(lambda: "x" in a._busy, timeout_s=10.0, what="an exchange with x")
        net.unlisten("x")  # and from now on x answers no probe at all
        await asyncio.sleep(3.0)
        m = a.membership.members["x"]
        assert "x" in a._busy, "the exchange was cut"
        assert m.state is MemberState.ALIVE, m
        assert a.metrics.value("syncfw_peer_transitions_total", state="dead") == 0
    finally:
        await a.aclose()
        await x.aclose()
