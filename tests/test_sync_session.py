"""The sans-IO sync session, driven in lockstep by SessionPair (no event loop)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfw.codec import BATCH_VERSION, COMPRESS_ZSTD, encode_batch
from syncfw.errors import DecodeError, StorageFullError
from syncfw.exchange.pair import SessionPair
from syncfw.log import op_hash
from syncfw.sync import (
    PROTOCOL_VERSION,
    Ack,
    ApplyOps,
    Close,
    Digest,
    End,
    FetchOps,
    Frame,
    Hello,
    Ops,
    PeerInfo,
    Peers,
    Send,
    Session,
    SessionConfig,
    SessionState,
    Status,
    Summary,
)
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.ops import OpWriter
from syncfw.transport.wire import decode_frame, encode_frame


def _pair(a: MemoryReplica, b: MemoryReplica, **kw: object) -> SessionPair:
    return SessionPair(a, b, encode=encode_frame, decode=decode_frame, **kw)  # type: ignore[arg-type]


def _fill(r: MemoryReplica, n: int, size: int = 16) -> None:
    for i in range(n):
        r.put(f"fleet/{r.node_id}/k{i}", "v" * size)


def _converged(*rs: MemoryReplica) -> bool:
    first = rs[0]
    return all(r.vv() == first.vv() and r.state == first.state for r in rs)


def test_in_sync_costs_one_round_trip_and_a_few_hundred_bytes() -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, 5)
    _fill(b, 5)
    assert _pair(a, b).run().a == (Status.OK, "synced")
    res = _pair(a, b).run()
    assert res.a == (Status.OK, "in sync")
    assert res.b == (Status.OK, "in sync")
    assert res.round_trips == 1
    assert res.wire_bytes < 300
    assert a.acks["b"] == a.vv()


def test_diverged_replicas_converge_both_ways() -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, 10)
    _fill(b, 2500, size=200)
    res = _pair(a, b).run()
    assert res.a is not None
    assert res.a[0] is Status.OK
    assert res.b is not None
    assert res.b[0] is Status.OK
    assert _converged(a, b)
    # the acks carry the receiver's vector and are persisted on the sender
    assert a.acks["b"] == a.vv()
    assert b.acks["a"] == b.vv()


def test_batches_respect_the_peers_cap_and_window() -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, 500, size=300)
    cfg_b = SessionConfig(max_batch_bytes=8 * 1024, zstd=False)
    pair = _pair(a, b, config_b=cfg_b, config_a=SessionConfig(window=2))
    seen: list[int] = []

    def spy(sender: str, frame: Frame) -> Frame:
        if isinstance(frame, Ops) and sender == "a":
            seen.append(len(frame.batch))
        return frame

    pair._tamper = spy
    res = pair.run()
    assert res.a is not None
    assert res.a[0] is Status.OK
    assert _converged(a, b)
    assert len(seen) > 10
    assert max(seen) <= 8 * 1024


def test_zstd_only_to_peers_that_advertise_it() -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, 200, size=100)
    modes: list[int] = []

    def spy(sender: str, frame: Frame) -> Frame:
        if isinstance(frame, Ops) and frame.batch[2:]:
            modes.append(frame.batch[1])
        return frame

    _pair(a, b, config_b=SessionConfig(zstd=False), tamper=spy).run()
    assert modes
    assert set(modes) == {0}
    c = MemoryReplica("c")
    modes.clear()
    _pair(a, c, tamper=spy).run()
    assert COMPRESS_ZSTD in modes


def test_peers_are_gossiped_after_hello() -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    s = Session("a", "default", peers=[PeerInfo("c", "127.0.0.1:1", 3)])
    effects = s.start({})
    assert [type(e.frame) for e in effects if isinstance(e, Send)] == [Hello, Peers, Digest]
    s.receive(Hello(PROTOCOL_VERSION, "default", "b"))
    learned = s.receive(Peers((PeerInfo("d", "127.0.0.1:2", 1),)))
    assert learned
    assert learned[0].peers[0].node_id == "d"
    assert _pair(a, b).run().a is not None


@pytest.mark.parametrize("cut", range(40))
def test_a_cut_at_any_frame_leaves_both_consistent_and_the_next_exchange_resumes(cut: int) -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, 300, size=100)
    _fill(b, 150, size=100)
    small = SessionConfig(max_batch_bytes=4096, window=2)
    _pair(a, b, config_a=small, config_b=small).run(cut_after=cut)
    for r in (a, b):  # whatever was applied is whole chains, nothing half-merged
        for origin, chain in r.chains.items():
            assert [op.seq for op in chain] == list(range(1, len(chain) + 1)), origin
        assert not r.pending
    held_before = sum(len(c) for c in b.chains.values())
    res = _pair(a, b, config_a=small, config_b=small).run()
    assert res.a is not None, res
    assert res.a[0] is Status.OK, res
    assert _converged(a, b)
    # the resumed exchange sent only what was still missing
    assert res.frames >= 4
    assert sum(len(c) for c in b.chains.values()) == 450 >= held_before
    assert all(n == 1 for n in b.apply_count.values())


# -- bad input: every case ends the exchange with a clear status, applies nothing ------


def _started(node: str = "a") -> Session:
    s = Session(node, "default")
    s.start({})
    return s


def _ended(effects: list[object]) -> End:
    assert effects
    last = effects[-1]
    assert isinstance(last, End), effects
    return last


@pytest.mark.parametrize(
    ("hello", "match"),
    [
        (Hello(PROTOCOL_VERSION + 1, "default", "b"), "protocol"),
        (Hello(PROTOCOL_VERSION, "other-fleet", "b"), "fleet"),
        (Hello(PROTOCOL_VERSION, "default", "a"), "node id"),
        (Hello(PROTOCOL_VERSION, "default", ""), "node id"),
    ],
)
def test_bad_hello_ends_with_failed_precondition(hello: Hello, match: str) -> None:
    s = _started()
    effects = s.receive(hello)
    end = _ended(effects)
    assert end.status is Status.FAILED_PRECONDITION
    assert match in end.reason
    # the peer is told why, in band
    assert isinstance(effects[0], Send)
    assert isinstance(effects[0].frame, Close)
    assert s.state is SessionState.FAILED
    assert s.receive(Digest(b"\0" * 16)) == []


def test_frames_out_of_order_end_with_invalid_argument() -> None:
    for frame in (Digest(b"\0" * 16), Summary({}), Ops(b""), Ack({}), Peers(())):
        end = _ended(_started().receive(frame))
        assert end.status is Status.INVALID_ARGUMENT, frame


def _streaming() -> Session:
    s = _started()
    s.receive(Hello(PROTOCOL_VERSION, "default", "b", max_batch_bytes=1 << 20))
    s.receive(Digest(b"\1" * 16))
    effects = s.receive(Summary({}))
    assert any(isinstance(e, FetchOps) for e in effects)
    s.ops_fetched([])
    return s


def _ops_frame(ops: list[object]) -> Ops:
    return Ops(encode_batch(ops))  # type: ignore[arg-type]


def test_malformed_batch_ends_the_exchange_and_applies_nothing() -> None:
    for batch in (b"", b"\x01", b"\x01\x00\xc1", b"\x02\x00\x90", b"\x01\x01garbage"):
        s = _streaming()
        effects = s.receive(Ops(batch))
        assert not any(isinstance(e, ApplyOps) for e in effects)
        assert _ended(effects).status is Status.INVALID_ARGUMENT


def test_truncated_batch_is_refused() -> None:
    w = OpWriter("b")
    data = encode_batch([w.write(f"k{i}", "x" * 50) for i in range(40)])
    s = _streaming()
    effects = s.receive(Ops(data[: len(data) // 2]))
    assert not any(isinstance(e, ApplyOps) for e in effects)
    assert _ended(effects).status is Status.INVALID_ARGUMENT


def test_oversized_batch_is_refused() -> None:
    s = Session("a", "default", config=SessionConfig(max_batch_bytes=1024))
    s.start({})
    s.receive(Hello(PROTOCOL_VERSION, "default", "b"))
    s.receive(Digest(b"\1" * 16))
    s.receive(Summary({}))
    w = OpWriter("b")
    effects = s.receive(_ops_frame([w.write(f"k{i}", "x" * 100) for i in range(40)]))
    assert _ended(effects).status is Status.RESOURCE_EXHAUSTED


def test_zstd_bomb_in_a_batch_is_refused() -> None:
    import zstandard

    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x91" + b"\x00" * (64 << 20))
    s = _streaming()
    effects = s.receive(Ops(bytes((BATCH_VERSION, COMPRESS_ZSTD)) + bomb))
    end = _ended(effects)
    assert end.status is Status.INVALID_ARGUMENT
    assert "cap" in end.reason


def test_a_gap_is_refused_before_anything_is_applied() -> None:
    w = OpWriter("b")
    ops = [w.write(f"k{i}", i) for i in range(5)]
    s = _streaming()
    effects = s.receive(_ops_frame([ops[0], ops[1], ops[3]]))
    assert not any(isinstance(e, ApplyOps) for e in effects)
    end = _ended(effects)
    assert end.status is Status.INVALID_ARGUMENT
    assert "gap" in end.reason


def test_forged_prev_ends_with_data_loss_and_nothing_applied() -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(b, 20)

    def forge(sender: str, frame: Frame) -> Frame:
        if sender == "b" and isinstance(frame, Ops) and len(frame.batch) > 10:
            from syncfw.codec import decode_batch

            ops = decode_batch(frame.batch)
            ops[7] = dataclasses.replace(ops[7], prev=b"\x07" * 32)
            return Ops(encode_batch(ops), frame.last)
        return frame

    res = _pair(a, b, tamper=forge).run()
    assert res.a is not None
    assert res.a[0] is Status.DATA_LOSS
    assert res.b is not None
    assert res.b[0] is Status.DATA_LOSS
    assert a.vv() == {}  # atomic: nothing of the batch


def test_fork_ends_with_data_loss() -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(b, 3)
    assert _pair(a, b).run().a is not None
    # b "forgets" and rewrites seq 3 differently: a holds the original
    evil = MemoryReplica("b")
    w = OpWriter("b")
    for i in range(4):
        op = w.write(f"k{i}", "other")
        evil.chains.setdefault("b", []).append(op)
        evil.hashes.setdefault("b", []).append(op_hash(op))
    res = _pair(a, evil).run()
    assert res.a is not None
    assert res.a[0] is Status.DATA_LOSS
    assert a.vv() == {"b": 3}


def test_an_ack_with_nothing_in_flight_is_a_protocol_error() -> None:
    s = _started()
    s.receive(Hello(PROTOCOL_VERSION, "default", "b"))
    s.receive(Digest(b"\1" * 16))
    s.receive(Summary({}))
    assert _ended(s.receive(Ack({"x": 1}))).status is Status.INVALID_ARGUMENT


def test_peer_close_ends_without_answering() -> None:
    s = _started()
    effects = s.receive(Close(Status.UNAVAILABLE, "going away"))
    assert effects == [End(Status.UNAVAILABLE, "peer closed: going away")]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_wire_frames_only_raise_decode_error(data: bytes) -> None:
    try:
        frame = decode_frame(data)
    except DecodeError:
        return
    s = _streaming()
    for effect in s.receive(frame):  # whatever it is, the session copes
        assert not isinstance(effect, ApplyOps) or effect.ops


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 60), st.integers(0, 60), st.integers(1, 4))
def test_any_split_of_writes_converges(na: int, nb: int, window: int) -> None:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, na, 40)
    _fill(b, nb, 40)
    cfg = SessionConfig(max_batch_bytes=1024, window=window, batch_ops=7)
    res = _pair(a, b, config_a=cfg, config_b=cfg).run()
    assert res.a is not None
    assert res.a[0] is Status.OK
    assert _converged(a, b)


# -- property: any distribution of chains, any exchanges and cuts, converges ---------------

from hypothesis import HealthCheck  # noqa: E402

from syncfw.testing.strategies import chains, op_tuples  # noqa: E402


def _seed(r: MemoryReplica, ops: list[object]) -> None:
    for op in ops:
        r._append(op)  # type: ignore[arg-type]
        r._merge(op)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains(), st.data())
def test_any_distribution_exchanges_and_cuts_converge(
    ops: dict[str, list[object]], data: st.DataObject
) -> None:
    rs = [MemoryReplica("a"), MemoryReplica("b"), MemoryReplica("c")]
    expected: dict[str, int] = {}
    for origin, chain in ops.items():  # each replica holds a prefix of each chain
        for r in rs:
            n = data.draw(st.integers(0, len(chain)))
            _seed(r, chain[:n])
            if n > expected.get(origin, 0):
                expected[origin] = n
    cfg = SessionConfig(max_batch_bytes=512, batch_ops=3, window=data.draw(st.integers(1, 3)))
    for _ in range(data.draw(st.integers(0, 6))):
        i, j = data.draw(st.permutations(range(3)))[:2]
        cut = data.draw(st.none() | st.integers(0, 30))
        _pair(rs[i], rs[j], config_a=cfg, config_b=cfg).run(cut_after=cut)
    for i, j in ((0, 1), (1, 2), (0, 1)):
        res = _pair(rs[i], rs[j], config_a=cfg, config_b=cfg).run()
        assert res.a is not None
        assert res.a[0] is Status.OK, res
    assert _converged(*rs)
    assert rs[0].vv() == expected
    for r in rs:
        assert all(n == 1 for n in r.apply_count.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(op_tuples(), max_size=4))
def test_fuzz_op_shaped_batches(items: list[tuple[object, ...]]) -> None:
    import msgpack

    s = _streaming()
    try:
        body = msgpack.packb(items, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    effects = s.receive(Ops(bytes((BATCH_VERSION, 0)) + body))
    # either every op is valid and goes to ApplyOps, or the exchange ends with nothing applied
    assert any(isinstance(e, (ApplyOps, End)) for e in effects) or not items


def test_a_replica_answering_with_stale_ops_does_not_loop() -> None:
    w = OpWriter("a")
    ops = [w.write(f"k{i}", i) for i in range(3)]
    s = _started()
    s.receive(Hello(PROTOCOL_VERSION, "default", "b"))
    s.receive(Digest(b"\1" * 16))
    effects = s.receive(Summary({"a": 3}))
    assert any(isinstance(e, FetchOps) for e in effects)
    # the replica ignores the vector and returns what the peer already holds
    effects = s.ops_fetched(ops)
    sent = [e.frame for e in effects if isinstance(e, Send)]
    assert sent == [Ops(encode_batch([]), last=True)]
    assert s.ops_sent == 0


def _late_answers_run(seed: int) -> str:
    """Two sessions whose performer answers effects late, interleaved at random with frames."""
    import random

    from syncfw.exchange.pair import drive
    from syncfw.sync import Acknowledge, LoadPeerAck

    rng = random.Random(seed)
    reps = {"a": MemoryReplica("a"), "b": MemoryReplica("b")}
    for i in range(rng.randrange(60)):
        reps["a"].put(f"fleet/a/k{i}", "x" * 50)
    for i in range(rng.randrange(60)):
        reps["b"].put(f"fleet/b/k{i}", "y" * 50)
    cfg = SessionConfig(max_batch_bytes=600, batch_ops=4, window=2)
    ss = {k: Session(k, "default", config=cfg) for k in reps}
    inbox: dict[str, list[Frame]] = {"a": [], "b": []}
    pending: list[tuple[str, object]] = []

    def perform(side: str, effects: list[object]) -> None:
        for e in effects:
            other = "b" if side == "a" else "a"
            if isinstance(e, Send):
                inbox[other].append(decode_frame(encode_frame(e.frame)))
            elif isinstance(e, FetchOps | ApplyOps | LoadPeerAck):
                pending.append((side, e))
            elif isinstance(e, Acknowledge):
                drive(reps[side].acknowledge(e.peer, e.vv))

    for k in ss:
        perform(k, ss[k].start(drive(reps[k].version_vector())))  # type: ignore[arg-type]
    for _ in range(10_000):
        if all(s.ended for s in ss.values()):
            break
        choices = [("f", k) for k in inbox if inbox[k]] + [
            ("p", str(i)) for i in range(len(pending))
        ]
        if not choices:
            return "idle"
        kind, x = rng.choice(choices)
        if kind == "f":
            perform(x, ss[x].receive(inbox[x].pop(0)))  # type: ignore[arg-type]
            continue
        side, e = pending.pop(int(x))
        r = reps[side]
        if isinstance(e, FetchOps):
            got = drive(r.ops_since(e.vv, limit=e.limit, max_bytes=e.max_bytes))
            perform(side, ss[side].ops_fetched(got))  # type: ignore[arg-type]
        elif isinstance(e, LoadPeerAck):
            perform(side, ss[side].peer_ack_loaded(drive(r.peer_ack(e.peer))))  # type: ignore[arg-type]
        else:
            assert isinstance(e, ApplyOps)
            drive(r.apply_remote(list(e.ops)))
            perform(side, ss[side].ops_applied(drive(r.version_vector())))  # type: ignore[arg-type]
    if not all(s.status is Status.OK for s in ss.values()):
        return f"ended {[s.status for s in ss.values()]}"
    return "ok" if _converged(reps["a"], reps["b"]) else "diverged"


def test_late_answers_in_any_interleaving_still_converge() -> None:
    bad = {seed: r for seed in range(300) if (r := _late_answers_run(seed)) != "ok"}
    assert not bad, f"failing seeds: {dict(list(bad.items())[:5])}"


# -- delta summaries ------------------------------------------------------------------


def _yard(n_origins: int) -> tuple[MemoryReplica, MemoryReplica]:
    """Two replicas in sync holding one op from each of many origins."""
    a, b = MemoryReplica("a"), MemoryReplica("b")
    for i in range(n_origins):
        w = OpWriter(f"t{i:03}")
        _seed(a, [w.write("k", i)])
    _fill(b, 1)
    res = _pair(a, b).run()
    assert res.a is not None
    assert res.a[0] is Status.OK
    assert a.acks["b"] == b.acks["a"] == a.vv()  # both recorded the common vector
    return a, b


def _summaries(pair: SessionPair) -> list[tuple[str, Summary]]:
    seen: list[tuple[str, Summary]] = []

    def spy(sender: str, frame: Frame) -> Frame:
        if isinstance(frame, Summary):
            seen.append((sender, frame))
        return frame

    pair._tamper = spy
    return seen


def test_summaries_go_as_deltas_after_a_sync() -> None:
    a, b = _yard(100)
    a.put("fleet/a/new", 1)
    pair = _pair(a, b)
    seen = _summaries(pair)
    res = pair.run()
    assert res.a is not None
    assert res.a[0] is Status.OK
    assert _converged(a, b)
    assert all(s.base_digest for _, s in seen)
    assert max(len(s.vv) for _, s in seen) <= 1
    whole = _yard(100)
    whole[0].put("fleet/a/new", 1)
    full = SessionConfig(delta_summary=False)
    res_full = _pair(*whole, config_a=full, config_b=full).run()
    assert res.wire_bytes * 3 < res_full.wire_bytes


def test_a_delta_against_a_stale_record_asks_for_the_whole_vector() -> None:
    a, b = _yard(60)
    a.acks["b"]["t000"] = 99  # a's record of b no longer matches b's record of a
    a.put("fleet/a/new", 1)
    b.put("fleet/b/new", 2)
    pair = _pair(a, b)
    seen = _summaries(pair)
    res = pair.run()
    assert res.a is not None
    assert res.a[0] is Status.OK
    assert res.b is not None
    assert res.b[0] is Status.OK
    assert _converged(a, b)
    assert any(s.want_full for _, s in seen)
    assert any(not s.base_digest and not s.want_full and len(s.vv) > 50 for _, s in seen)


def test_ops_may_arrive_while_waiting_for_the_whole_vector() -> None:
    a, b = _yard(60)
    b.acks["a"] = {"zzz": 1, **b.acks["a"]}  # records differ
    for i in range(30):  # and a's vector moved in many origins: a sends it whole
        w = OpWriter(f"new{i}")
        _seed(a, [w.write("k", i)])
    b.put("fleet/b/more", 1)
    pair = _pair(a, b)
    seen = _summaries(pair)
    res = pair.run()
    assert res.a is not None
    assert res.a[0] is Status.OK, res
    assert _converged(a, b)
    kinds = [(side, bool(s.base_digest), s.want_full) for side, s in seen]
    assert ("a", False, False) in kinds  # a's vector went whole
    assert ("a", False, True) in kinds  # a could not use b's delta and asked


def test_a_second_want_full_is_a_protocol_error() -> None:
    s = _streaming()
    effects = s.receive(Summary(want_full=True))
    assert isinstance(effects[0], Send)
    assert isinstance(effects[0].frame, Summary)
    assert _ended(s.receive(Summary(want_full=True))).status is Status.INVALID_ARGUMENT


# -- the pair runs the one performer: its error policy, without an event loop ---------


class _FailingAcks(MemoryReplica):
    """A replica whose ack record cannot be written (a storage failure of syncfw's tree)."""

    async def acknowledge(self, peer: str, vv: object) -> None:  # type: ignore[override]
        raise StorageFullError("disk full")


class _BuggyFetch(MemoryReplica):
    """A replica with a bug (not a syncfw error) in ops_since."""

    async def ops_since(self, vv: object, **kw: object) -> list[object]:  # type: ignore[override]
        raise KeyError("bug")


def test_pair_ends_internal_when_an_ack_cannot_be_recorded() -> None:
    a, b = _FailingAcks("a"), MemoryReplica("b")
    _fill(a, 3)
    res = _pair(a, b).run()
    assert res.a is not None
    assert res.a[0] is Status.INTERNAL
    assert "could not record ack" in res.a[1]
    assert res.b is not None
    assert res.b[0] is Status.INTERNAL  # told in band


def test_pair_degrades_to_whole_summaries_when_the_ack_record_is_unreadable(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _yard(40)

    async def unreadable(peer: str) -> dict[str, int]:
        raise StorageFullError("cannot read")

    monkeypatch.setattr(a, "peer_ack", unreadable)
    b.put("fleet/b/more", 1)
    pair = _pair(a, b)
    seen = _summaries(pair)
    with caplog.at_level(logging.WARNING, logger="syncfw.sync"):
        res = pair.run()
    assert res.a is not None
    assert res.a[0] is Status.OK, res
    assert _converged(a, b)
    assert not any(s.base_digest for side, s in seen if side == "a")  # a's went whole
    assert any("no ack record of b" in r.getMessage() for r in caplog.records)


def test_pair_logs_a_replica_bug_with_its_traceback_and_ends_internal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = _BuggyFetch("a"), MemoryReplica("b")
    _fill(b, 2)
    with caplog.at_level(logging.ERROR, logger="syncfw.sync"):
        res = _pair(a, b).run()
    assert res.a is not None
    assert res.a[0] is Status.INTERNAL
    bug = [r for r in caplog.records if "reading ops failed unexpectedly" in r.getMessage()]
    assert bug
    assert bug[0].exc_info is not None


def test_the_performer_needs_no_event_loop() -> None:
    import asyncio

    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # this test runs outside any loop
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _fill(a, 50)
    res = _pair(a, b).run()
    assert res.a == (Status.OK, "synced")
    assert _converged(a, b)


# -- clock offsets as NTP intervals, batch sizes per link -----------------------------


def test_a_shared_clock_with_slow_hellos_reads_as_in_step_within_its_uncertainty() -> None:
    from syncfw.sync.links import ClockEstimate, ClockFilter

    # one clock, 8 s each way (the false warnings): the midpoint is 0
    est = ClockEstimate.round_trip(t0=1_000, t1=9_000, t2=9_000, t3=17_000)
    assert est.offset_ms == 0 and est.uncertainty_ms == 8_000
    assert not est.exceeds(500)
    # a peer 2 s ahead over a 100 ms round trip is beyond 500 ms plus the uncertainty
    ahead = ClockEstimate.round_trip(t0=0, t1=2_050, t2=2_050, t3=100)
    assert ahead.offset_ms == 2_000 and ahead.uncertainty_ms == 50 and ahead.exceeds(500)
    # a one-way (responder's) sample bounds from below only: behind is never claimed
    assert ClockEstimate(-3_000).exceeds(500) is False
    assert ClockEstimate(3_000).exceeds(500) is True
    # the filter intersects recent samples, and starts afresh when a clock steps
    f = ClockFilter()
    f.add(ClockEstimate(-100, 300))
    assert f.add(ClockEstimate(0, 500)) == ClockEstimate(0, 300)
    assert f.add(ClockEstimate(5_000, 5_100)) == ClockEstimate(5_000, 5_100)


def test_batches_start_small_grow_on_fast_acks_and_shrink_on_slow_ones() -> None:
    from syncfw.sync.links import BatchSizer

    s = BatchSizer(size=8192, floor=2048, cap=65536)
    s.acked(8192, 0.1)
    assert s.size == 16384
    s.acked(16384, None)  # no clock: fast
    assert s.size == 32768
    s.acked(32768, 4.0)
    assert s.size == 16384 and s.rate_bps is not None
    s.timed_out()
    assert s.size == 2048
    for _ in range(10):
        s.acked(1, 0.0)
    assert s.size == 65536


@pytest.mark.parametrize(
    ("vv", "ok"),
    [
        ({}, True),
        ({"a": 0, "b": 5}, True),
        ({"": 1}, False),
        ({1: 1}, False),
        ({"a": -1}, False),
        ({"a": 1.0}, False),
        ({"a": True}, False),
        ({"a": 1, "b": None}, False),
    ],
)
def test_a_vector_from_a_peer_is_checked_whole(vv: dict[Any, Any], ok: bool) -> None:
    from syncfw.sync.session import _well_formed

    assert _well_formed(vv) is ok
