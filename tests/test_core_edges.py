"""Edge cases found by review: hostile Yjs headers, the HLC ceiling."""

from __future__ import annotations

import time

import pytest

from syncfw.clock import HLC
from syncfw.crdt import YDOC, OpView
from syncfw.errors import ClockError, DecodeError


def test_impossible_yjs_struct_count_is_refused_without_allocating() -> None:
    started = time.perf_counter()
    with pytest.raises(DecodeError):
        YDOC.apply(YDOC.empty(), OpView("n1", 1, 1, b"\xff\xff\xff\x7f\x00"))
    with pytest.raises(DecodeError):
        YDOC.decode(b"\xff\xff\xff\x7f\x00")
    with pytest.raises(DecodeError):
        YDOC.decode(b"\xff" * 12)  # a varint that never ends
    # Honouring 2**31 structs would take minutes or exhaust memory; refusing takes
    # microseconds. The bound is generous so a busy machine cannot make it flake.
    assert time.perf_counter() - started < 2.0


def test_hlc_refuses_to_pass_64_bits() -> None:
    clock = HLC(lambda: 0, high_water=(1 << 64) - 2)
    assert clock.now() == (1 << 64) - 1
    with pytest.raises(ClockError):
        clock.now()
    with pytest.raises(ClockError):
        clock.observe(0)
    assert clock.last == (1 << 64) - 1
