"""Version vectors in columns on the wire (``vv_origins`` + packed ``vv_seqs``).

Summaries and Acks go in columns only to a peer whose Hello advertised
``vv_cols``; an older peer reads only ``VvEntry`` rows. Either form decodes
always, checked as strictly as rows are.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfw.errors import DecodeError
from syncfw.exchange.pair import SessionPair, drive
from syncfw.sync import Ack, Frame, SessionConfig, Status, Summary
from syncfw.sync.frames import MAX_FEATURE_CHARS, MAX_FEATURES, MAX_NODE_ID_CHARS
from syncfw.sync.session import VV_COLUMNS
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.ops import OpWriter
from syncfw.transport._pb import sync_pb2 as pb
from syncfw.transport.wire import decode_frame, encode_frame

_vectors = st.dictionaries(
    st.text(min_size=1, max_size=MAX_NODE_ID_CHARS),
    st.integers(min_value=0, max_value=(1 << 64) - 1),
    max_size=40,
)


# -- the encoding --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(vv=_vectors, columns=st.booleans(), delta=st.booleans(), want_full=st.booleans())
def test_summaries_round_trip_in_either_form(
    vv: dict[str, int], columns: bool, delta: bool, want_full: bool
) -> None:
    frame = Summary(vv, b"\x07" * 16 if delta else b"", want_full, columns)
    got = decode_frame(encode_frame(frame))
    assert isinstance(got, Summary)
    assert got == frame
    assert dict(got.vv) == vv
    assert (got.base_digest, got.want_full) == (frame.base_digest, want_full)
    assert got.columns is (columns and bool(vv))  # an empty vector has no form
    body = pb.Frame.FromString(encode_frame(frame)).summary
    assert (len(body.vv), len(body.vv_origins), len(body.vv_seqs)) == (
        (0, len(vv), len(vv)) if columns else (len(vv), 0, 0)
    )


@settings(max_examples=200, deadline=None)
@given(vv=_vectors, columns=st.booleans())
def test_acks_round_trip_in_either_form(vv: dict[str, int], columns: bool) -> None:
    got = decode_frame(encode_frame(Ack(vv, columns)))
    assert isinstance(got, Ack)
    assert dict(got.vv) == vv
    assert got.columns is (columns and bool(vv))
    # the two forms carry one vector: frames equal whatever form they travelled in
    assert got == decode_frame(encode_frame(Ack(vv, not columns))) == Ack(vv)


def test_columns_are_sorted_by_origin_and_smaller_than_rows() -> None:
    vv = {f"node-{i:04}": 1000 + i for i in reversed(range(1000))}
    rows, cols = encode_frame(Summary(vv)), encode_frame(Summary(vv, columns=True))
    body = pb.Frame.FromString(cols).summary
    assert list(body.vv_origins) == sorted(vv)
    assert list(body.vv_seqs) == [vv[o] for o in sorted(vv)]
    assert len(cols) < 0.85 * len(rows)


def _summary_pb(**fields: object) -> bytes:
    return pb.Frame(summary=pb.Summary(**fields)).SerializeToString()  # type: ignore[arg-type]


def _ack_pb(**fields: object) -> bytes:
    return pb.Frame(ack=pb.Ack(**fields)).SerializeToString()  # type: ignore[arg-type]


@pytest.mark.parametrize("make", [_summary_pb, _ack_pb], ids=["Summary", "Ack"])
@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"vv_origins": ["a", "b"], "vv_seqs": [1]}, "columns differ in length: 2 origins, 1 seqs"),
        ({"vv_origins": ["a"], "vv_seqs": [1, 2]}, "columns differ in length: 1 origins, 2 seqs"),
        ({"vv_seqs": [3]}, "columns differ in length: 0 origins, 1 seqs"),
        ({"vv_origins": ["a"]}, "columns differ in length: 1 origins, 0 seqs"),
        ({"vv_origins": ["a", "b", "a"], "vv_seqs": [1, 2, 3]}, "empty or repeated origin"),
        ({"vv_origins": ["a", ""], "vv_seqs": [1, 2]}, "empty or repeated origin"),
        (
            {"vv_origins": ["a", "x" * (MAX_NODE_ID_CHARS + 1)], "vv_seqs": [1, 2]},
            f"origin of {MAX_NODE_ID_CHARS + 1} chars exceeds {MAX_NODE_ID_CHARS}",
        ),
        (
            {"vv": [pb.VvEntry(origin="a", seq=1)], "vv_origins": ["b"], "vv_seqs": [2]},
            "both as entries and in columns",
        ),
    ],
)
def test_malformed_columns_are_refused(
    make: Callable[..., bytes], fields: dict[str, object], words: str
) -> None:
    with pytest.raises(DecodeError, match=words):
        decode_frame(make(**fields))


def test_an_origin_at_the_limit_is_accepted_in_columns() -> None:
    longest = "x" * MAX_NODE_ID_CHARS
    got = decode_frame(_summary_pb(vv_origins=[longest, "a"], vv_seqs=[5, 0]))
    assert isinstance(got, Summary) and dict(got.vv) == {longest: 5, "a": 0} and got.columns


# -- negotiation ---------------------------------------------------------------------------


def _fill(r: MemoryReplica, n: int) -> None:
    for i in range(n):
        r.put(f"fleet/{r.node_id}/k{i}", i)


def _spread(n_origins: int, *replicas: MemoryReplica) -> None:
    """The same op from each of ``n_origins`` origins on every replica."""
    for i in range(n_origins):
        op = OpWriter(f"t{i:03}").write("k", i)
        for r in replicas:
            drive(r.apply_remote([op]))


class _Wire:
    """Records each non-empty Summary and Ack as it arrived on the wire (sender,
    kind, in columns), and the form each side chose for its Acks (most are empty:
    both sides read acks as implied by the batch)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bool]] = []
        self.acks: list[tuple[str, bool]] = []

    def pair(self, a: MemoryReplica, b: MemoryReplica, **kw: object) -> SessionPair:
        pair = SessionPair(a, b, encode=encode_frame, decode=self.decode, **kw)  # type: ignore[arg-type]
        pair._tamper = self.tamper
        self._sender = ""
        return pair

    def tamper(self, sender: str, frame: Frame) -> Frame:
        self._sender = sender
        if isinstance(frame, Ack):
            self.acks.append((sender, frame.columns))
        return frame

    def decode(self, data: bytes) -> Frame:
        msg = pb.Frame.FromString(data)
        kind = msg.WhichOneof("body")
        if kind in ("summary", "ack"):
            body = getattr(msg, kind)
            if len(body.vv) or len(body.vv_origins):
                self.seen.append((self._sender, kind, bool(body.vv_origins)))
        return decode_frame(data)


def _diverged() -> tuple[MemoryReplica, MemoryReplica]:
    a, b = MemoryReplica("a"), MemoryReplica("b")
    _spread(30, a, b)
    _fill(a, 40)
    _fill(b, 25)
    return a, b


def test_the_feature_fits_the_hello_bounds() -> None:
    assert len(VV_COLUMNS) <= MAX_FEATURE_CHARS
    session = SessionPair(MemoryReplica("a"), MemoryReplica("b")).sessions["a"]
    assert VV_COLUMNS in session._features()
    assert len(session._features()) <= MAX_FEATURES
    assert (
        VV_COLUMNS
        not in SessionPair(
            MemoryReplica("a"), MemoryReplica("b"), config_a=SessionConfig(vv_columns=False)
        )
        .sessions["a"]
        ._features()
    )


def test_two_peers_with_the_feature_send_vectors_in_columns_and_converge() -> None:
    a, b = _diverged()
    wire = _Wire()
    res = wire.pair(a, b).run()
    assert (res.a, res.b) == ((Status.OK, "synced"), (Status.OK, "synced"))
    assert a.vv() == b.vv() and a.state == b.state
    assert {(sender, kind) for sender, kind, _ in wire.seen} == {("a", "summary"), ("b", "summary")}
    assert all(columns for _, _, columns in wire.seen)
    assert {sender for sender, _ in wire.acks} == {"a", "b"}
    assert all(columns for _, columns in wire.acks)


@pytest.mark.parametrize("old", ["a", "b"])
def test_a_peer_without_the_feature_gets_rows_and_the_pair_converges(old: str) -> None:
    a, b = _diverged()
    wire = _Wire()
    plain = SessionConfig(vv_columns=False)  # an older peer: reads and sends rows only
    kw = {"config_a": plain} if old == "a" else {"config_b": plain}
    pair = wire.pair(a, b, **kw)
    res = pair.run()
    assert (res.a, res.b) == ((Status.OK, "synced"), (Status.OK, "synced"))
    assert a.vv() == b.vv() and a.state == b.state
    assert {sender for sender, _, _ in wire.seen} == {"a", "b"}
    assert not any(columns for _, _, columns in wire.seen)
    assert {sender for sender, _ in wire.acks} == {"a", "b"}
    assert not any(columns for _, columns in wire.acks)
    new = "b" if old == "a" else "a"
    assert VV_COLUMNS in pair.sessions[old].peer.features  # type: ignore[union-attr]
    assert VV_COLUMNS not in pair.sessions[new].peer.features  # type: ignore[union-attr]
