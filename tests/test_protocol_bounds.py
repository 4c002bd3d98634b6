"""Bounded protocol input and truthful outcomes.

Field caps on every Hello, gossip and op field (checked where frames and
batches are decoded), cheap checks before hashing and large batches decoded
off the event loop, ``Close(OK)`` before comparing vectors never counted as a
success, fleet bootstrap digests compared in Hello, and clock offsets read
from wall clocks, not hybrid clocks. Session-level cases run in lockstep
(:class:`SessionPair`); the last ones go through a real node over gRPC.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from conftest import raw_exchange

import syncfw.codec
import syncfw.log
from syncfw.clock import wall_ms
from syncfw.codec import DEFAULT_LIMITS, decode_batch, encode_batch
from syncfw.errors import ChainError, DecodeError
from syncfw.exchange import ExchangeOutcome, SessionPair, run_exchange
from syncfw.exchange.runner import cpu_budget
from syncfw.log import MAX_KEY_BYTES, Op
from syncfw.node import Node
from syncfw.sync import (
    PROTOCOL_VERSION,
    Close,
    DecodeOps,
    Digest,
    End,
    Frame,
    Hello,
    Ops,
    PeerInfo,
    Peers,
    Session,
    Status,
    Summary,
)
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.ops import OpWriter
from syncfw.testing.waiting import wait_until
from syncfw.transport.admission import CpuShare
from syncfw.transport.base import FrameStream
from syncfw.transport.memory import memory_pipe
from syncfw.transport.rpc import ChannelPool, GrpcServer
from syncfw.transport.wire import decode_frame, encode_frame
from syncfw.zones import Fleet, Grant

FLEET = Fleet(fleet_id="f")
DAY_MS = 86_400_000


def _end(effects: list[Any]) -> End:
    assert effects and isinstance(effects[-1], End), effects
    return effects[-1]


def _bad_chain(n: int = DEFAULT_LIMITS.max_ops) -> list[Op]:
    """``n`` chained ops of one origin whose last op breaks the chain."""
    w = OpWriter("evil")
    ops = [w.write(f"k{i}", i) for i in range(n)]
    ops[-1] = dataclasses.replace(ops[-1], prev=b"\x01" * 32)
    return ops


# -- field caps, at decode ---------------------------------------------------------


@pytest.mark.parametrize(
    ("hello", "words"),
    [
        (Hello(1, "f", "n" * (4 << 20)), "Hello.node_id of 4194304 chars exceeds 256"),
        (Hello(1, "f" * 257, "n"), "Hello.fleet_id of 257 chars exceeds 256"),
        (Hello(1, "f", "n", features=tuple(f"x{i}" for i in range(17))), "17 entries, over 16"),
        (Hello(1, "f", "n", features=("z" * 33,)), "Hello.features entry of 33 chars exceeds 32"),
        (Hello(1, "f", "n", fleet_digest=b"x" * 5), "fleet_digest is 5 bytes, not 16"),
    ],
)
def test_hello_fields_over_their_limits_are_refused_naming_field_and_limit(
    hello: Hello, words: str
) -> None:
    with pytest.raises(DecodeError) as err:
        decode_frame(encode_frame(hello))
    assert words in str(err.value)
    assert len(str(err.value)) < 200  # the field is never echoed whole


def test_hello_fields_at_their_limits_round_trip() -> None:
    hello = Hello(
        1,
        "f" * 256,
        "n" * 256,
        features=tuple("z" * 32 for _ in range(16)),
        fleet_digest=b"d" * 16,
        wall_ms=1_700_000_000_000,
    )
    assert decode_frame(encode_frame(hello)) == hello


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        (Peers((PeerInfo("n" * 257),)), "Peers node_id of 257 chars exceeds 256"),
        (Peers((PeerInfo("n", "a" * 257),)), "Peers address of 257 chars exceeds 256"),
        (Summary({"o" * 257: 1}), "version vector origin of 257 chars exceeds 256"),
    ],
)
def test_gossip_and_vector_strings_are_bounded(frame: Frame, words: str) -> None:
    with pytest.raises(DecodeError, match=words):
        decode_frame(encode_frame(frame))


def test_a_peers_close_reason_is_cut_before_it_reaches_a_reason() -> None:
    frame = decode_frame(encode_frame(Close(Status.INTERNAL, "x" * 100_000)))
    assert isinstance(frame, Close) and len(frame.reason) == 1000
    s = Session("a", "f")
    s.start({})
    end = _end(s.receive(frame))
    assert end.status is Status.INTERNAL
    assert len(end.reason) < 160 and end.reason.endswith("…")


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("key", "k" * (512 << 10), "op key of 524288 chars exceeds 1024"),
        ("key", "é" * 513, "op key of 513 chars exceeds 1024 UTF-8 bytes"),
        ("zone", "z" * 1025, "op zone of 1025 chars exceeds 1024"),
        ("kind", "k" * 33, "op kind of 33 chars exceeds 32"),
    ],
)
def test_op_string_fields_over_their_limits_are_refused(field: str, value: str, words: str) -> None:
    op = dataclasses.replace(OpWriter("n").write("x", 1), **{field: value})
    with pytest.raises(DecodeError, match=words):
        Op.from_tuple(op.to_tuple())
    with pytest.raises(DecodeError, match=words):
        decode_batch(encode_batch([op]))


def test_an_op_key_at_the_limit_is_accepted() -> None:
    op = dataclasses.replace(OpWriter("n").write("x", 1), key="é" * (MAX_KEY_BYTES // 2))
    assert Op.from_tuple(op.to_tuple()) == op


def test_a_batch_with_a_huge_key_ends_the_exchange_and_applies_nothing() -> None:
    a, b = MemoryReplica("a", FLEET), MemoryReplica("b", FLEET)
    op = a.put("fleet/a/x", 1)
    huge = encode_batch([dataclasses.replace(op, key="fleet/a/" + "k" * (512 << 10))])

    def tamper(sender: str, frame: Frame) -> Frame:
        if sender == "a" and isinstance(frame, Ops) and not frame.last:
            return Ops(huge)
        return frame

    res = SessionPair(a, b, tamper=tamper).run()
    assert res.b is not None and res.b[0] is Status.INVALID_ARGUMENT
    assert "exceeds 1024" in res.b[1] and len(res.b[1]) < 200
    assert b.vv() == {}


# -- CPU per batch ---------------------------------------------------------------------


def test_a_chain_broken_at_the_end_of_the_largest_batch_is_refused_before_any_hash_or_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = encode_batch(_bad_chain(), zstd=True, elide_prev=True)
    hashed: list[Any] = []
    real = syncfw.log.tuple_hash
    monkeypatch.setattr(syncfw.log, "tuple_hash", lambda t: hashed.append(t) or real(t))
    assert len(decode_batch(encode_batch(_bad_chain(3)[:2], elide_prev=True))) == 2
    assert len(hashed) == 1, "the patched hash is not the one decoding uses"
    hashed.clear()
    with pytest.raises(ChainError, match=rf"'evil', {DEFAULT_LIMITS.max_ops}"):
        decode_batch(data)
    assert hashed == []  # the explicit prev was found from the tuple headers alone


def test_a_batch_of_more_ops_than_the_cap_is_refused_from_its_header() -> None:
    data = encode_batch(
        _bad_chain(DEFAULT_LIMITS.max_ops + 1),
        zstd=True,
        elide_prev=True,
        limits=dataclasses.replace(DEFAULT_LIMITS, max_ops=DEFAULT_LIMITS.max_ops + 1),
    )
    t0 = time.thread_time()
    with pytest.raises(DecodeError, match=f"exceed the batch cap of {DEFAULT_LIMITS.max_ops}"):
        decode_batch(data)
    assert time.thread_time() - t0 < 0.05  # one inflate, no op unpacked


def test_a_gap_in_a_batch_is_refused_from_the_headers() -> None:
    ops = [OpWriter("n").write("a", 1), OpWriter("m").write("b", 2)]
    assert decode_batch(encode_batch(ops), after={"n": 5}) == ops  # a duplicate is no gap
    w = OpWriter("n")
    later = [w.write(f"k{i}", i) for i in range(3)][2:]
    with pytest.raises(DecodeError, match="gap in origin 'n': op 3 after 1"):
        decode_batch(encode_batch(later), after={"n": 1})


def test_the_session_refuses_the_bad_batch_data_loss_through_a_decode_effect() -> None:
    s = Session("b", "f")
    s.start({})
    s.receive(Hello(PROTOCOL_VERSION, "f", "evil"))
    s.receive(Digest(b"\x01" * 16))
    s.receive(Summary({}))
    effects = s.receive(Ops(encode_batch(_bad_chain(), zstd=True, elide_prev=True)))
    (decode,) = effects
    assert isinstance(decode, DecodeOps)  # large: the performer may decode it elsewhere
    with pytest.raises(ChainError) as err:
        decode_batch(decode.batch, limits=decode.limits, after=decode.after)
    end = _end(s.decode_failed(err.value))
    assert end.status is Status.DATA_LOSS


async def test_the_runner_decodes_large_batches_on_its_worker_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from syncfw.exchange import performer

    threads: list[str] = []
    real = performer.decode_batch

    def spy(*args: Any, **kwargs: Any) -> list[Op]:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(performer, "decode_batch", spy)
    a = MemoryReplica("a", FLEET)
    for i in range(400):
        a.put(f"fleet/a/k{i}", os.urandom(64))  # incompressible: batches over 4 KiB
    b = MemoryReplica("b", FLEET)
    x, y = memory_pipe("a", "b")
    ra, rb = await asyncio.gather(run_exchange(a, x), run_exchange(b, y))
    assert ra.ok and rb.ok, (ra, rb)
    assert b.vv() == {"a": 400}
    assert threads and all(t.startswith("syncfw-decode") for t in threads)


# -- truthful outcomes -----------------------------------------------------------------


@pytest.mark.parametrize("after_summary", [False, True])
def test_close_ok_before_the_vectors_were_compared_is_not_a_success(after_summary: bool) -> None:
    s = Session("b", "f")
    s.start({"b": 1})
    s.receive(Hello(PROTOCOL_VERSION, "f", "evil"))
    if after_summary:
        s.receive(Digest(b"\x01" * 16))
        s.receive(Summary({}))
    end = _end(s.receive(Close(Status.OK, "all good, honest")))
    assert end.status is Status.ABORTED
    assert "before comparing vectors" in end.reason


# -- fleet bootstrap digest ------------------------------------------------------------


def test_the_bootstrap_digest_is_stable_and_ignores_order() -> None:
    g1, g2 = Grant.of("site/", "*"), Grant.of("trucks/t7/", "t7", "t8")
    f = Fleet(fleet_id="f", grants=(g1, g2))
    assert f.bootstrap_digest() == Fleet(fleet_id="f", grants=(g2, g1)).bootstrap_digest()
    assert len(f.bootstrap_digest()) == 16
    others = [
        Fleet(fleet_id="g", grants=(g1, g2)),
        Fleet(fleet_id="f", grants=(g1,)),
        Fleet(fleet_id="f", authority="hq", grants=(g1, g2)),
        Fleet(fleet_id="f", grants=(g1, g2), telemetry=("metrics/",)),
        Fleet(fleet_id="f", grants=(g1, g2), priorities=(("sys/", 1),)),
        Fleet(fleet_id="f", grants=(g1, g2), node_zones=("fleet/{node}/",)),
    ]
    digests = {o.bootstrap_digest() for o in others}
    assert len(digests) == len(others) and f.bootstrap_digest() not in digests


def test_peers_with_different_bootstraps_refuse_naming_both_digests() -> None:
    f1 = Fleet(fleet_id="f", grants=(Grant.of("site/", "*"),))
    f2 = Fleet(fleet_id="f")
    a, b = MemoryReplica("a", f1), MemoryReplica("b", f2)
    a.put("fleet/a/x", 1)
    res = SessionPair(a, b).run()
    for side in (res.a, res.b):
        assert side is not None and side[0] is Status.FAILED_PRECONDITION
        assert f1.bootstrap_digest().hex() in side[1] and f2.bootstrap_digest().hex() in side[1]
    assert b.vv() == {}


def test_a_peer_that_sends_no_digest_is_not_refused_for_it() -> None:
    s = Session("b", "f", fleet_digest=FLEET.bootstrap_digest())
    s.start({})
    assert not any(isinstance(e, End) for e in s.receive(Hello(PROTOCOL_VERSION, "f", "old")))


# -- clock offsets from wall clocks --------------------------------------------------------


def test_a_peer_a_day_behind_reads_minus_a_day_even_after_the_hlcs_met() -> None:
    now = 1_700_000_000_000
    a = MemoryReplica("a", FLEET, wall=lambda: now)
    b = MemoryReplica("b", FLEET, wall=lambda: now - DAY_MS)
    a.put("fleet/a/x", 1)
    b.put("fleet/b/y", 2)
    for _ in range(2):  # the second time b's hybrid clock has observed a's
        pair = SessionPair(a, b)
        res = pair.run()
        assert res.a is not None and res.a[0] is Status.OK
        assert pair.sessions["a"].peer_clock_offset_ms == -DAY_MS
        assert pair.sessions["b"].peer_clock_offset_ms == DAY_MS
        a.put("fleet/a/x", 3)
    assert abs((b.hlc_now() >> 16) - now) < 1000  # b's HLC alone would read "in step"


def test_no_offset_without_wall_clocks() -> None:
    pair = SessionPair(MemoryReplica("a", FLEET), MemoryReplica("b", FLEET))
    pair.run()
    assert pair.sessions["a"].peer_clock_offset_ms is None


# -- through a real node over gRPC ---------------------------------------------------------


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Node, GrpcServer, list[ExchangeOutcome]]]:
    node = await Node.open(tmp_path / "b.db", node_id="b", fleet=FLEET)
    await node.put("fleet/b/x", 1)
    # every peer here is one host (loopback, no mTLS): what a refused batch costs its
    # sender's host (CpuShare.refused_batch_s) is test_hostile_cpu's, not this file's
    budget = cpu_budget(node)
    assert budget is not None
    budget.share = CpuShare(refused_batch_s=0)
    outcomes: list[ExchangeOutcome] = []

    async def handler(stream: FrameStream) -> None:
        outcomes.append(await run_exchange(node, stream))

    server = await GrpcServer.start("127.0.0.1:0", handler)
    yield node, server, outcomes
    await server.aclose(grace_s=0)
    await node.close()


async def _raw(address: str, frames: list[bytes]) -> tuple[grpc.StatusCode, str]:
    return await raw_exchange(address, frames, timeout_s=20)


def _opening(hello: Hello | None = None) -> list[bytes]:
    hello = hello or Hello(PROTOCOL_VERSION, "f", "evil", fleet_digest=FLEET.bootstrap_digest())
    return [encode_frame(hello), encode_frame(Digest(b"\x01" * 16)), encode_frame(Summary({}))]


async def test_a_real_node_refuses_hostile_hellos_and_batches_and_keeps_serving(
    served: tuple[Node, GrpcServer, list[ExchangeOutcome]], caplog: pytest.LogCaptureFixture
) -> None:
    node, server, outcomes = served
    before = await node.version_vector()
    other = Fleet(fleet_id="f", grants=(Grant.of("site/", "*"),)).bootstrap_digest()
    key_op = dataclasses.replace(
        OpWriter("evil").write("x", 1), key="fleet/evil/" + "k" * (512 << 10)
    )
    cases = [
        (
            [encode_frame(Hello(PROTOCOL_VERSION, "f", "n" * (4 << 20)))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "Hello.node_id of 4194304 chars exceeds 256",
        ),
        (
            _opening(Hello(PROTOCOL_VERSION, "f", "evil", fleet_digest=other)),
            grpc.StatusCode.FAILED_PRECONDITION,
            other.hex(),
        ),
        (
            [*_opening(), encode_frame(Ops(encode_batch([key_op])))],
            grpc.StatusCode.INVALID_ARGUMENT,
            "op key of",
        ),
        (
            [
                *_opening(),
                encode_frame(Ops(encode_batch(_bad_chain(), zstd=True, elide_prev=True))),
            ],
            grpc.StatusCode.DATA_LOSS,
            f"'evil', {DEFAULT_LIMITS.max_ops}",
        ),
    ]
    with caplog.at_level(logging.DEBUG, logger="syncfw"):
        for frames, code, words in cases:
            got, details = await _raw(server.address, frames)
            assert got is code, details
            assert words in details and len(details) < 400
        # Close(OK) right after Hello: not a success on the node's side
        await _raw(server.address, [*_opening()[:1], encode_frame(Close(Status.OK, "done"))])
    # the client's call can end before the node's handler has returned its outcome
    await wait_until(lambda: len(outcomes) == len(cases) + 1, what="the node's last outcome")
    assert outcomes[-1].status is Status.ABORTED, outcomes[-1]
    assert not any(o.ok for o in outcomes)
    assert all(len(r.getMessage()) < 2000 for r in caplog.records)  # nothing echoed whole
    assert await node.version_vector() == before
    # an honest peer is served; its wall clock a day behind reads as such
    good = MemoryReplica("good", FLEET, wall=lambda: wall_ms() - DAY_MS)
    good.put("fleet/good/y", 2)
    pool = ChannelPool()
    try:
        out = await run_exchange(good, await pool.open(server.address))
    finally:
        await pool.aclose()
    assert out.ok, out
    assert out.peer_clock_offset_ms is not None
    assert abs(out.peer_clock_offset_ms - DAY_MS) < 60_000
    assert (await node.version_vector())["good"] == 1


# -- log lines a flooding peer causes -------------------------------------------------


async def test_failed_exchanges_from_one_peer_log_one_warning_per_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    victim = MemoryReplica("v", FLEET)
    outsider = MemoryReplica("evil", Fleet(fleet_id="other"))
    with caplog.at_level(logging.DEBUG, logger="syncfw.sync"):
        for _ in range(20):  # another fleet, twenty times: FAILED_PRECONDITION
            x, y = memory_pipe("v", "evil")
            rv, _ = await asyncio.gather(run_exchange(victim, y), run_exchange(outsider, x))
            assert rv.status is Status.FAILED_PRECONDITION
    mine = [r for r in caplog.records if r.getMessage().startswith("exchange v <->")]
    warned = [r for r in mine if r.levelno == logging.WARNING]
    assert len(mine) == 20  # every exchange is still logged ...
    assert len(warned) == 1  # ... but one WARNING for the lot, the rest at DEBUG
    assert "FAILED_PRECONDITION" in warned[0].getMessage()
    # another node is told apart: its own first failure warns
    caplog.clear()
    other = MemoryReplica("w", FLEET)
    with caplog.at_level(logging.WARNING, logger="syncfw.sync"):
        x, y = memory_pipe("w", "evil")
        await asyncio.gather(run_exchange(other, y), run_exchange(outsider, x))
    assert any(r.getMessage().startswith("exchange w <->") for r in caplog.records)
