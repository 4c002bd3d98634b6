"""The op-batch codec: round trips, caps, zstd bombs and a fuzzed decoder."""

from __future__ import annotations

import contextlib
import dataclasses

import msgpack
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncfw.codec import (
    BATCH_VERSION,
    COMPRESS_NONE,
    COMPRESS_ZSTD,
    BatchLimits,
    decode_batch,
    encode_batch,
)
from syncfw.errors import ChainError, DecodeError
from syncfw.log import Op, op_hash
from syncfw.testing.ops import chain


def test_round_trip_plain_and_compressed() -> None:
    ops = chain("a", 200, value_size=64)
    plain = encode_batch(ops)
    packed = encode_batch(ops, zstd=True)
    assert plain[1] == COMPRESS_NONE
    assert packed[1] == COMPRESS_ZSTD
    assert len(packed) < len(plain)
    assert decode_batch(plain) == ops
    assert decode_batch(packed) == ops


def test_each_op_keeps_its_hash_and_an_elided_batch_brings_it_decoded() -> None:
    """op_hash is computed once per op object; a format-2 decoder already computed it
    for every op whose successor it rebuilt, and the value is the hash of the op."""
    ops = chain("a", 50, value_size=16)
    got = decode_batch(encode_batch(ops, elide_prev=True))
    assert got == ops
    assert [op._hash for op in got[:-1]] == [_fresh_hash(op) for op in ops[:-1]]
    assert got[-1]._hash is None  # no successor in the batch: computed when asked
    assert op_hash(got[-1]) == _fresh_hash(ops[-1]) == got[-1]._hash
    forged = dataclasses.replace(got[0], value=b"other")
    assert forged._hash is None and op_hash(forged) != op_hash(got[0])
    assert op_hash(dataclasses.replace(got[0], sig=b"s" * 64)) == op_hash(got[0])


def _fresh_hash(op: Op) -> bytes:
    """op_hash of a copy that holds no cached hash."""
    return op_hash(Op(*op.to_tuple()))


def test_small_batches_stay_uncompressed_even_with_zstd() -> None:
    ops = chain("a", 1)
    assert encode_batch(ops, zstd=True)[1] == COMPRESS_NONE


def test_empty_batch() -> None:
    assert decode_batch(encode_batch([])) == []


def test_encoder_refuses_batches_over_the_caps() -> None:
    with pytest.raises(ValueError, match="batch cap"):
        encode_batch(chain("a", 5), limits=BatchLimits(max_ops=4))
    with pytest.raises(ValueError, match="exceeds"):
        encode_batch(chain("a", 5, value_size=100), limits=BatchLimits(max_decompressed=200))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "shorter"),
        (b"\x01", "shorter"),
        (b"\x09\x00\x90", "version"),
        (b"\x01\x07\x90", "compression"),
        (b"\x01\x00\xc1", "msgpack"),
        (b"\x01\x00\x90\x90", "msgpack"),  # trailing data
        (b"\x01\x00\x01", "array"),
        (b"\x01\x00\x91\x01", "cannot hold the 1 ops"),  # refused unread
        (b"\x01\x00\x91\x9b" + b"\x01" * 11, "10 fields"),
        (b"\x01\x00\x92" + b"\x9a" + b"\x01" * 10 + b"\x01" * 12, "op 1 does not have 10 fields"),
        (b"\x01\x01not zstd", "zstd"),
    ],
)
def test_malformed_batches_raise_decode_error(data: bytes, match: str) -> None:
    with pytest.raises(DecodeError, match=match):
        decode_batch(data)


def test_truncated_batches_raise_decode_error() -> None:
    for zstd in (False, True):
        data = encode_batch(chain("a", 100, value_size=50), zstd=zstd)
        for cut in (3, len(data) // 2, len(data) - 1):
            with pytest.raises(DecodeError):
                decode_batch(data[:cut])


def test_oversized_batch_is_refused_before_decoding() -> None:
    data = encode_batch(chain("a", 50, value_size=100))
    with pytest.raises(DecodeError, match="cap"):
        decode_batch(data, limits=BatchLimits(max_compressed=len(data) - 1))


def test_invalid_op_field_is_refused() -> None:
    bad = chain("a", 1)[0].to_tuple()
    bad = (*bad[:8], b"short", None)
    with pytest.raises(DecodeError, match="prev"):
        decode_batch(bytes((BATCH_VERSION, COMPRESS_NONE)) + msgpack.packb([bad]))


def _bomb(size: int, *, declare: bool) -> bytes:
    zc = zstandard.ZstdCompressor(level=1, write_content_size=declare)
    # streamed in 1 MiB chunks so that building the bomb does not allocate it;
    # without a size hint the frame does not declare its content size
    obj = zc.compressobj(size=size) if declare else zc.compressobj()
    chunk = b"\x00" * (1 << 20)
    out = b"".join(obj.compress(chunk) for _ in range(size >> 20))
    return out + obj.flush()


def test_zstd_bomb_declaring_its_size_is_refused_without_inflating() -> None:
    bomb = _bomb(256 << 20, declare=True)  # 256 MiB of zeros in a few KiB
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="declares"):
        decode_batch(bytes((BATCH_VERSION, COMPRESS_ZSTD)) + bomb)


def test_zstd_bomb_hiding_its_size_is_cut_at_the_cap() -> None:
    import resource

    bomb = _bomb(64 << 20, declare=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    limits = BatchLimits(max_decompressed=1 << 20)
    with pytest.raises(DecodeError, match="cap"):
        decode_batch(bytes((BATCH_VERSION, COMPRESS_ZSTD)) + bomb, limits=limits)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"decoding a bomb grew RSS by {grown_kib} KiB"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_only_ever_raise_decode_error(data: bytes) -> None:
    try:
        ops = decode_batch(data)
    except DecodeError:
        return
    assert isinstance(ops, list)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_batches(data: st.DataObject) -> None:
    zstd = data.draw(st.booleans())
    raw = bytearray(
        encode_batch(chain("n", data.draw(st.integers(0, 30)), value_size=40), zstd=zstd)
    )
    for _ in range(data.draw(st.integers(1, 4))):
        if not raw:
            break
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    with contextlib.suppress(DecodeError, ChainError):  # v1 read as v2: explicit prevs
        decode_batch(bytes(raw))


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=20)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=11) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_values, max_size=5))
def test_fuzz_structured_msgpack_payloads(items: list[object]) -> None:
    body = msgpack.packb(items, use_bin_type=True)
    for mode in (COMPRESS_NONE, COMPRESS_ZSTD):
        payload = zstandard.ZstdCompressor().compress(body) if mode else body
        with contextlib.suppress(DecodeError):
            decode_batch(bytes((BATCH_VERSION, mode)) + payload)


def test_batches_encode_and_decode_on_many_threads_at_once() -> None:
    """Batches are encoded on the event loop and decoded on worker threads; zstandard's
    objects must never be shared between threads (a shared decompressor corrupted
    frames and could crash the process)."""
    import threading

    from syncfw.codec import decode_batch, encode_batch
    from syncfw.testing import chain

    ops = chain("n1", 300, value_size=64)
    data = encode_batch(ops, zstd=True)
    errors: list[str] = []

    def work() -> None:
        for _ in range(100):
            try:
                assert decode_batch(data) == ops
                assert decode_batch(encode_batch(ops, zstd=True)) == ops
            except Exception as exc:  # collected: a thread's failure must fail the test
                errors.append(repr(exc))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- one rule for building ops: ops_from_tuples accepts exactly what from_tuple does ----

_FIELD = {
    0: st.one_of(st.sampled_from(["n1", "n2", ""]), st.text(max_size=3), st.just("o" * 257), st.integers()),
    1: st.one_of(st.integers(-1, 5), st.booleans(), st.text(max_size=1)),
    2: st.one_of(st.integers(-1, 5), st.just(1 << 64), st.just((1 << 64) - 1), st.floats()),
    3: st.one_of(st.just("fleet/n1/"), st.text(max_size=4), st.just("z" * 300), st.none()),
    4: st.one_of(st.integers(-1, 3), st.booleans()),
    5: st.one_of(st.just("fleet/n1/k"), st.just("k" * 257), st.just("é" * 300), st.just("😀" * 256),
                 st.binary(max_size=2)),
    6: st.one_of(st.just("lww"), st.just("k" * 9), st.just("é" * 17), st.just("€" * 11), st.integers()),
    7: st.one_of(st.binary(max_size=3), st.text(max_size=1)),
    8: st.one_of(st.just(b"\x01" * 32), st.binary(max_size=33), st.none()),
    9: st.one_of(st.none(), st.just(b"s" * 64), st.just(b"s" * 65), st.just(b""), st.text(max_size=1)),
}
_GOOD = ("n1", 1, 5, "fleet/n1/", 0, "fleet/n1/k", "lww", b"v", b"\x01" * 32, None)


@st.composite
def _tuples(draw: st.DrawFn) -> tuple[object, ...]:
    t = list(_GOOD)
    for i in draw(st.sets(st.integers(0, 9), max_size=2)):
        t[i] = draw(_FIELD[i])
    return tuple(t) if draw(st.integers(0, 20)) else tuple(t[:9])


@given(st.lists(_tuples(), min_size=1, max_size=6))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_ops_from_tuples_accepts_and_refuses_exactly_what_from_tuple_does(
    items: list[tuple[object, ...]],
) -> None:
    from syncfw.log import Op, ops_from_tuples

    try:
        want: list[Op] | str = [Op.from_tuple(t) for t in items]
    except DecodeError as exc:
        want = str(exc)
    try:
        got: list[Op] | str = ops_from_tuples(items)
    except DecodeError as exc:
        got = str(exc)
    assert got == want
    if isinstance(got, list):
        assert [hash(o) for o in got] == [hash(o) for o in want]  # type: ignore[union-attr]
        assert all(type(o) is Op for o in got)
