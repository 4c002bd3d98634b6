"""One LWW rule: the guarded SQL upsert picks the winner ``lww_wins`` picks."""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncfw import Fleet, Grant, Node
from syncfw.clock import HLC
from syncfw.crdt.lww import LwwState, lww_wins
from syncfw.errors import ClockError, DecodeError
from syncfw.log import GENESIS, Op, encode_value
from syncfw.store.planner import HLC_LIMIT
from syncfw.store.schema import SCHEMA_V1
from syncfw.store.sql import UPSERT_LWW

# Origins as a peer may send them: any non-surrogate code point, astral ones included.
origins = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=6) | st.sampled_from(
    ["a", "é", "\U0001f600", "\uffff", "\U00010000", "z\x00", "ü"]
)
# Every hlc SQLite can hold (the store refuses the rest, tested below), crowded at the edges.
hlcs = st.integers(0, HLC_LIMIT - 1) | st.sampled_from([0, 1, 2**32, 2**62, HLC_LIMIT - 2, HLC_LIMIT - 1])
payloads = st.binary(max_size=8) | st.just(b"")
writes = st.lists(st.tuples(hlcs, origins, payloads), min_size=1, max_size=12)

_keys = itertools.count()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path_factory.mktemp("lww") / "lww.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    for stmt in SCHEMA_V1.split(";"):
        if stmt.strip():
            conn.execute(stmt)
    yield conn
    conn.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ws=writes, tie=st.booleans())
def test_sql_upsert_and_lww_wins_pick_the_same_winner(
    db: sqlite3.Connection, ws: list[tuple[int, str, bytes]], tie: bool
) -> None:
    if tie:  # the same hlc (and origin) for all: origin, then payload bytes decide
        ws = [(ws[0][0], ws[0][1] if i % 2 else o, p) for i, (_, o, p) in enumerate(ws)]
    key = f"k{next(_keys)}"
    state: LwwState = None
    for hlc, origin, payload in ws:
        db.execute("BEGIN")
        db.execute(UPSERT_LWW, (key, hlc, origin, payload))
        db.execute("COMMIT")
        if lww_wins((hlc, origin, payload), state):
            state = (hlc, origin, payload)
        row = db.execute("SELECT hlc, origin, data FROM state WHERE kind = 'lww' AND key = ?", (key,)).fetchone()
        assert tuple(row) == state


FLEET = Fleet(fleet_id="lww", grants=(Grant.of("site/", "*"),))
START_MS = 1_790_000_000_000


async def test_an_hlc_sqlite_cannot_store_is_refused_and_nothing_is_applied(tmp_path: Path) -> None:
    # a wall clock past the year 6429 would let the clock accept the op: the
    # planner still refuses it before anything reaches SQLite
    far = (HLC_LIMIT >> 16) + 5
    async with Node.open(tmp_path / "n.db", node_id="n", fleet=FLEET, clock=lambda: far) as node:
        good = Op("t", 1, 5, "site/", 1, "site/a", "lww", encode_value(1), GENESIS)
        bad = Op("t", 2, HLC_LIMIT, "site/", 1, "site/b", "lww", encode_value(2), GENESIS)
        for batch in ([bad], [good, dataclasses.replace(bad, prev=b"\x01" * 32)]):
            with pytest.raises(DecodeError, match="2\\*\\*63"):
                await node.apply_remote(batch)
        assert await node.version_vector() == {}
        # a local write stamped there fails alone, with a clock error; the store goes on
        with pytest.raises(ClockError):
            await node.put("site/x", 1)
        assert (await node.apply_remote([good])).applied == 1
        assert await node.get("site/a") == 1


def test_the_hlc_reaches_2_63_only_with_a_wall_clock_past_2_47_ms() -> None:
    assert HLC(lambda: (1 << 47) - 1).now() < HLC_LIMIT
    assert HLC(lambda: 1 << 47).now() >= HLC_LIMIT
