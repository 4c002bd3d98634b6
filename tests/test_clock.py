"""The hybrid logical clock: monotonicity, the receive rule, skew refusal, high water.

The clock is driven by an injected wall clock, so every test here is exact:
no sleeping, no reliance on the machine's time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncfw.clock import (
    HLC,
    LOGICAL_BITS,
    MAX_PHYSICAL_MS,
    hlc_logical,
    hlc_pack,
    hlc_physical,
    wall_ms,
)
from syncfw.errors import ClockError, ClockSkewError, SyncfwError

LOGICAL_MAX = (1 << LOGICAL_BITS) - 1
T0 = 1_700_000_000_000  # a plausible wall clock, in ms


class ScriptedWall:
    """A wall clock that returns the next value of a script, then repeats the last one."""

    def __init__(self, values: Iterable[int]) -> None:
        self._it: Iterator[int] = iter(values)
        self.current = next(self._it)
        self._first = True
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self._first:
            self._first = False
            return self.current
        self.current = next(self._it, self.current)
        return self.current


class SettableWall:
    """A wall clock the test sets by hand."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


# --- packing ---------------------------------------------------------------


def test_timestamp_layout_is_48_bit_ms_and_16_bit_logical() -> None:
    ts = hlc_pack(T0, 7)
    assert ts == (T0 << 16) | 7
    assert hlc_physical(ts) == T0
    assert hlc_logical(ts) == 7
    assert hlc_pack(MAX_PHYSICAL_MS, LOGICAL_MAX) == (1 << 64) - 1
    # Comparing ints compares (physical, logical) lexicographically.
    assert hlc_pack(T0, LOGICAL_MAX) < hlc_pack(T0 + 1, 0)


@given(
    physical=st.integers(min_value=0, max_value=MAX_PHYSICAL_MS),
    logical=st.integers(min_value=0, max_value=LOGICAL_MAX),
)
def test_pack_round_trips(physical: int, logical: int) -> None:
    ts = hlc_pack(physical, logical)
    assert 0 <= ts < 1 << 64
    assert hlc_physical(ts) == physical
    assert hlc_logical(ts) == logical


@given(
    a=st.tuples(st.integers(0, MAX_PHYSICAL_MS), st.integers(0, LOGICAL_MAX)),
    b=st.tuples(st.integers(0, MAX_PHYSICAL_MS), st.integers(0, LOGICAL_MAX)),
)
def test_packed_order_is_lexicographic_order(a: tuple[int, int], b: tuple[int, int]) -> None:
    assert (hlc_pack(*a) < hlc_pack(*b)) == (a < b)


@pytest.mark.parametrize(
    ("physical", "logical", "match"),
    [
        (-1, 0, "48 bits"),
        (MAX_PHYSICAL_MS + 1, 0, "48 bits"),
        (0, -1, "16 bits"),
        (0, LOGICAL_MAX + 1, "16 bits"),
    ],
)
def test_pack_refuses_out_of_range(physical: int, logical: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hlc_pack(physical, logical)


def test_wall_ms_is_the_system_clock_in_ms() -> None:
    import time

    before = time.time_ns() // 1_000_000
    got = wall_ms()
    after = time.time_ns() // 1_000_000
    assert before <= got <= after


def test_wall_reads_the_injected_clock_without_touching_the_hlc() -> None:
    wall = SettableWall(T0)
    clock = HLC(wall, high_water=hlc_pack(T0 + 9, 0))
    assert clock.wall() == T0
    wall.ms = T0 - 50
    assert clock.wall() == T0 - 50
    assert clock.last == hlc_pack(T0 + 9, 0)


def test_negative_max_offset_is_refused() -> None:
    with pytest.raises(ValueError, match="max_offset_ms"):
        HLC(SettableWall(T0), max_offset_ms=-1)


# --- the send rule -----------------------------------------------------------


def test_now_follows_the_wall_clock_when_it_moves_forward() -> None:
    clock = HLC(ScriptedWall([T0, T0 + 5, T0 + 9]))
    assert clock.now() == hlc_pack(T0, 0)
    assert clock.now() == hlc_pack(T0 + 5, 0)
    assert clock.now() == hlc_pack(T0 + 9, 0)
    assert clock.last == hlc_pack(T0 + 9, 0)


def test_now_is_strictly_monotonic_when_the_wall_clock_steps_back() -> None:
    wall = ScriptedWall([T0, T0 + 100, T0 - 5_000, T0 - 5_000, T0 + 50, T0 + 101, T0 + 101])
    clock = HLC(wall)
    stamps = [clock.now() for _ in range(7)]
    assert stamps == [
        hlc_pack(T0, 0),
        hlc_pack(T0 + 100, 0),
        # the wall went back 5.1 s: keep the physical part, count logically
        hlc_pack(T0 + 100, 1),
        hlc_pack(T0 + 100, 2),
        hlc_pack(T0 + 100, 3),
        # the wall caught up: back to physical time, logical reset
        hlc_pack(T0 + 101, 0),
        hlc_pack(T0 + 101, 1),
    ]


def test_logical_overflow_carries_into_the_physical_part() -> None:
    wall = SettableWall(T0)  # frozen: every timestamp must come from the logical part
    clock = HLC(wall)
    stamps = [clock.now() for _ in range(70_000)]
    assert all(a < b for a, b in pairwise(stamps))
    assert stamps[0] == hlc_pack(T0, 0)
    assert stamps[LOGICAL_MAX] == hlc_pack(T0, LOGICAL_MAX)
    # the 65,537th timestamp carries into the physical part instead of wrapping
    assert stamps[LOGICAL_MAX + 1] == hlc_pack(T0 + 1, 0)
    assert hlc_physical(stamps[-1]) == T0 + 1
    assert hlc_logical(stamps[-1]) == 70_000 - 1 - (LOGICAL_MAX + 1)
    # once the wall clock passes the borrowed millisecond, physical time leads again
    wall.ms = T0 + 2
    assert clock.now() == hlc_pack(T0 + 2, 0)


# --- the receive rule (Kulkarni et al. 2014, Fig. 5) ----------------------------


def kulkarni_receive(last: int, remote: int, pt_ms: int) -> int:
    """The paper's receive rule on (l, c) pairs, written out case by case."""
    l_j, c_j = hlc_physical(last), hlc_logical(last)
    l_m, c_m = hlc_physical(remote), hlc_logical(remote)
    l_new = max(l_j, l_m, pt_ms)
    if l_new == l_j == l_m:
        c_new = max(c_j, c_m) + 1
    elif l_new == l_j:
        c_new = c_j + 1
    elif l_new == l_m:
        c_new = c_m + 1
    else:
        c_new = 0
    # a logical counter beyond 16 bits carries into the physical part
    return (l_new << LOGICAL_BITS) + c_new


def test_observe_with_the_wall_ahead_resets_the_logical_part() -> None:
    wall = SettableWall(T0)
    clock = HLC(wall, high_water=hlc_pack(T0 - 10, 40))
    ts = clock.observe(hlc_pack(T0 - 3, 900))
    assert ts == hlc_pack(T0, 0)
    assert clock.last == ts


def test_observe_with_the_remote_ahead_takes_its_counter_plus_one() -> None:
    clock = HLC(SettableWall(T0), high_water=hlc_pack(T0, 3))
    remote = hlc_pack(T0 + 200, 17)  # ahead, but within the default 500 ms
    assert clock.observe(remote) == hlc_pack(T0 + 200, 18)
    # the next local event stays above what was observed
    assert clock.now() == hlc_pack(T0 + 200, 19)


def test_observe_with_equal_physical_parts_takes_the_larger_counter_plus_one() -> None:
    clock = HLC(SettableWall(T0 - 1), high_water=hlc_pack(T0, 30))
    assert clock.observe(hlc_pack(T0, 12)) == hlc_pack(T0, 31)
    assert clock.observe(hlc_pack(T0, 90)) == hlc_pack(T0, 91)


@settings(max_examples=300)
@given(
    pt=st.integers(T0 - 10_000, T0 + 10_000),
    last_ms=st.integers(T0 - 10_000, T0 + 10_000),
    last_c=st.integers(0, LOGICAL_MAX),
    remote_ms=st.integers(T0 - 10_000, T0 + 10_000),
    remote_c=st.integers(0, LOGICAL_MAX),
)
def test_observe_matches_the_paper(
    pt: int, last_ms: int, last_c: int, remote_ms: int, remote_c: int
) -> None:
    clock = HLC(SettableWall(pt), max_offset_ms=20_000, high_water=hlc_pack(last_ms, last_c))
    last, remote = clock.last, hlc_pack(remote_ms, remote_c)
    got = clock.observe(remote)
    assert got == kulkarni_receive(last, remote, pt)
    assert got > last
    assert got > remote
    assert hlc_physical(got) >= pt
    assert clock.last == got


# --- skew --------------------------------------------------------------------


def test_remote_too_far_ahead_is_refused_and_the_clock_is_unchanged() -> None:
    wall = SettableWall(T0)
    clock = HLC(wall, max_offset_ms=500)
    before = clock.now()
    remote = hlc_pack(T0 + 501, 0)
    with pytest.raises(ClockSkewError) as info:
        clock.observe(remote)
    err = info.value
    assert isinstance(err, ClockError)
    assert isinstance(err, SyncfwError)
    assert (err.remote_ms, err.local_ms, err.max_offset_ms) == (T0 + 501, T0, 500)
    assert "501 ms ahead" in str(err)
    assert clock.last == before
    with pytest.raises(ClockSkewError):
        clock.check(remote)
    assert clock.last == before
    # the next local timestamp does not jump towards the refused remote
    assert clock.now() == before + 1


def test_remote_exactly_max_offset_ahead_is_accepted() -> None:
    clock = HLC(SettableWall(T0), max_offset_ms=500)
    remote = hlc_pack(T0 + 500, LOGICAL_MAX)  # the logical part does not count
    clock.check(remote)
    assert clock.observe(remote) == remote + 1


def test_zero_max_offset_refuses_any_remote_ahead() -> None:
    clock = HLC(SettableWall(T0), max_offset_ms=0)
    assert clock.observe(hlc_pack(T0, 5)) == hlc_pack(T0, 6)
    with pytest.raises(ClockSkewError):
        clock.observe(hlc_pack(T0 + 1, 0))


def test_remote_behind_is_never_refused() -> None:
    clock = HLC(SettableWall(T0), max_offset_ms=0)
    assert clock.observe(hlc_pack(1, 0)) == hlc_pack(T0, 0)


# --- high water --------------------------------------------------------------


def test_high_water_is_never_undercut_when_the_rtc_is_far_in_the_past() -> None:
    high = hlc_pack(T0, 77)
    wall = SettableWall(0)  # an RTC reset to 1970 after a reboot
    clock = HLC(wall, high_water=high)
    assert clock.last == high
    stamps = [clock.now() for _ in range(100)]
    assert stamps[0] == high + 1
    assert all(ts > high for ts in stamps)
    assert all(a < b for a, b in pairwise(stamps))
    assert clock.observe(hlc_pack(5, 0)) > stamps[-1]


def test_advance_to_only_raises_the_high_water_mark() -> None:
    wall = SettableWall(T0)
    clock = HLC(wall)
    first = clock.now()
    far = hlc_pack(T0 + 3_600_000, 0)  # an hour ahead: advance_to does no skew check
    clock.advance_to(far)
    assert clock.last == far
    clock.advance_to(first)  # lower: ignored
    assert clock.last == far
    assert clock.now() == far + 1


@settings(max_examples=200)
@given(
    walls=st.lists(st.integers(0, 1 << 40), min_size=1, max_size=50),
    high=st.integers(0, (1 << 56)),
)
def test_never_at_or_below_high_water(walls: list[int], high: int) -> None:
    clock = HLC(ScriptedWall(walls), high_water=high)
    for _ in walls:
        assert clock.now() > high


# --- any interleaving ---------------------------------------------------------

# An event is ("now",) or ("observe", remote offset from the wall in ms, logical).
events = st.one_of(
    st.tuples(st.just("now"), st.just(0), st.just(0)),
    st.tuples(st.just("observe"), st.integers(-5_000, 1_000), st.integers(0, LOGICAL_MAX)),
)


@settings(max_examples=300)
@given(
    steps=st.lists(
        st.tuples(events, st.integers(-3_000, 3_000)),  # (event, wall clock step in ms)
        min_size=1,
        max_size=80,
    ),
    max_offset=st.integers(0, 600),
)
def test_any_interleaving_is_strictly_increasing(
    steps: list[tuple[tuple[str, int, int], int]], max_offset: int
) -> None:
    wall = SettableWall(T0)
    clock = HLC(wall, max_offset_ms=max_offset)
    issued: list[int] = []
    for (kind, remote_offset, remote_c), wall_step in steps:
        wall.ms += wall_step  # the wall clock jumps either way
        if kind == "now":
            issued.append(clock.now())
            continue
        remote = hlc_pack(wall.ms + remote_offset, remote_c)
        before = clock.last
        if remote_offset > max_offset:
            with pytest.raises(ClockSkewError):
                clock.observe(remote)
            assert clock.last == before
            continue
        ts = clock.observe(remote)
        assert ts > remote
        issued.append(ts)
        assert clock.last == ts
    assert all(a < b for a, b in pairwise(issued))
    assert all(hlc_physical(ts) <= MAX_PHYSICAL_MS for ts in issued)


def test_clock_watch_compares_the_mark_with_ntp_checked_time() -> None:
    from syncfw.clock import ClockState, ClockWatch, NtpResult, hlc_ahead_ms, hlc_pack

    watch = ClockWatch(max_ahead_ms=500)
    assert watch.report.state is ClockState.UNCHECKED
    mark = hlc_pack(10_000_000, 3)
    # the local clock reads 9,000,000 and is 1,000 s slow: true time is the mark
    assert hlc_ahead_ms(mark, 9_000_000, 1000.0) == 0.0
    level = watch.measured(NtpResult("s", 1000.0, 0.01), mark, 9_000_000)
    assert level.state is ClockState.OK and level.offset_ms == 1_000_000.0
    # the local clock reads the mark but NTP says it is an hour fast: an hour ahead
    got = watch.measured(NtpResult("s", -3600.0, 0.01), mark, 10_000_000)
    assert got.state is ClockState.AHEAD and got.ahead_ms == 3_600_000
    assert "never move back" in got.reason and got.checked_ms == 10_000_000 - 3_600_000
    failed = watch.failed("no NTP server answered")
    assert failed.state is ClockState.UNREACHABLE and failed.failures == 1
    assert failed.ahead_ms == got.ahead_ms  # the last measurement is kept
    assert watch.failed("again").failures == 2
    assert watch.status()["state"] == "unreachable"
    assert watch.measured(NtpResult("s", 0.0, 0.01), mark, 10_000_000).failures == 0
