"""Batch format 2: prev hashes implied by the op before are left out, and rebuilt."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from syncfw.codec import decode_batch, encode_batch
from syncfw.errors import ChainError, DecodeError
from syncfw.testing.ops import chain


def test_chained_runs_round_trip_and_shrink() -> None:
    ops = chain("t7", 200, value_size=8) + chain("t9", 50, value_size=8)
    v1 = encode_batch(ops)
    v2 = encode_batch(ops, elide_prev=True)
    assert v1[0] == 1 and v2[0] == 2
    assert decode_batch(v1) == decode_batch(v2) == ops
    assert len(v2) < len(v1) - 30 * 240  # ~32 bytes saved on every op but each run's first


def test_a_broken_chain_is_sent_as_it_is_and_refused_unhashed_on_decoding() -> None:
    ops = chain("t7", 5)
    forged = [*ops[:2], dataclasses.replace(ops[2], prev=b"\x01" * 32), *ops[3:]]
    data = encode_batch(forged, elide_prev=True)
    assert msgpack.unpackb(data[2:])[2][8] == b"\x01" * 32  # nothing is "repaired"
    with pytest.raises(ChainError, match="'t7', 3"):
        decode_batch(data)
    # format 1 carries every prev: the store checks the chain
    assert decode_batch(encode_batch(forged)) == forged


def test_an_elided_prev_without_its_predecessor_is_refused() -> None:
    ops = chain("t7", 3)
    rows = [list(op.to_tuple()) for op in ops]
    for bad in (
        [[*rows[0][:8], None, None]],  # first op of the batch
        [rows[0], [*rows[2][:8], None, None]],  # seq does not follow
        [rows[0], ["t9", *rows[1][1:8], None, None]],  # another origin
    ):
        data = bytes((2, 0)) + msgpack.packb(bad, use_bin_type=True)
        with pytest.raises(DecodeError, match=r"prev|gap in origin .t7.: op 3 after 1"):
            decode_batch(data)
