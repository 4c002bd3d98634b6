"""node.follow(): the log as a resumable stream with values, on real SQLite files."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import FLEET, START_MS, FakeClock, NodeFactory, exchange
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import syncfw
from syncfw import Fleet, Grant, Node
from syncfw.log import Op
from syncfw.store import follow as follow_mod
from syncfw.store.follow import FeedItem, Follow
from syncfw.testing.ops import OpWriter
from syncfw.testing.waiting import wait_until

T7 = "trucks/t7/"
T9 = "trucks/t9/"


async def take(feed: Follow, n: int, *, timeout_s: float = 10.0) -> list[FeedItem]:
    """The next ``n`` items (the timeout only bounds a broken test)."""
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(anext(feed), timeout_s))
    return out


def ids(items: Sequence[FeedItem]) -> list[tuple[str, int]]:
    return [(i.origin, i.seq) for i in items]


async def test_each_item_carries_the_value_written_at_its_seq(make_node: NodeFactory) -> None:
    t7 = await make_node("t7")
    for i in range(3):
        await t7.put(T7 + "x", {"i": i})
        await t7.put(T7 + f"other{i}", i)
    await t7.delete(T7 + "x")
    async with t7.follow() as feed:
        items = await take(feed, 7)
    x = [(it.seq, it.value, it.deleted) for it in items if it.key == T7 + "x"]
    assert x == [(1, {"i": 0}, False), (3, {"i": 1}, False), (5, {"i": 2}, False), (7, None, True)]
    assert await t7.get(T7 + "x") is None  # the current value differs from each one above
    assert all(it.local and not it.rejected and it.kind == "lww" for it in items)
    assert [it.op.hlc for it in items] == sorted(it.op.hlc for it in items)
    assert feed.position == {"t7": 7}


async def test_other_kinds_are_decoded_as_their_crdt_defines(make_node: NodeFactory) -> None:
    t7 = await make_node("t7")
    await t7.counter(T7 + "c").add(5)
    await t7.counter(T7 + "c").add(-2)
    await t7.set(T7 + "s").add("a")
    await t7.set(T7 + "s").remove("a")
    await t7.register(T7 + "r").set({"v": 1})
    async with t7.follow() as feed:
        values = [it.value for it in await take(feed, 5)]
    assert values == [
        {"p": 5, "n": 0},
        {"p": 5, "n": 2},
        {"op": "add", "element": "a"},
        {"op": "remove", "element": "a", "observed": [("t7", 3)]},
        {"value": {"v": 1}, "observed": []},
    ]


async def test_a_follower_item_decodes_its_value_when_read_and_equals_an_eager_one(
    make_node: NodeFactory,
) -> None:
    t7 = await make_node("t7")
    await t7.put(T7 + "x", {"i": 1})
    await t7.delete(T7 + "x")
    async with t7.follow() as feed:
        put, gone = await take(feed, 2)
    assert put._value is follow_mod._UNDECODED  # nothing decoded before it is read
    assert (put.value, put.deleted) == ({"i": 1}, False)
    assert (gone.deleted, gone.value) == (True, None)  # either attribute decodes both
    eager = FeedItem(put.op, {"i": 1}, False, True, False)
    assert eager == put and hash(eager) == hash(put) and repr(eager) == repr(put)
    assert FeedItem.of(put.op, True, False) == put != gone
    with pytest.raises(AttributeError, match="immutable"):
        put.local = False  # type: ignore[misc]
    # a payload that does not decode (only a rejected op can hold one) comes back raw
    bad = FeedItem.of(Op("t9", 1, 0, T9, 1, T9 + "k", "lww", b"\xc1"), False, True)
    assert (bad.value, bad.deleted) == (b"\xc1", False)


async def test_backlog_then_live_tail_with_remote_ops(make_node: NodeFactory) -> None:
    t7, t9 = await make_node("t7"), await make_node("t9")
    await t7.put_many({T7 + f"k{i}": i for i in range(5)})
    await t9.put(T9 + "a", "from t9")
    await exchange(t9, t7)
    async with t7.follow() as feed:
        backlog = await take(feed, 6)
        assert sorted(ids(backlog)) == [("t7", i) for i in range(1, 6)] + [("t9", 1)]
        assert {it.origin: it.local for it in backlog} == {"t7": True, "t9": False}
        assert feed.held == 0

        async def later() -> None:
            await t7.put(T7 + "live", "local")
            await t9.put(T9 + "b", "remote")
            await exchange(t9, t7)

        writer = asyncio.create_task(later())
        live = await take(feed, 2)
        await writer
    assert [(it.origin, it.seq, it.value, it.local) for it in live] == [
        ("t7", 6, "local", True),
        ("t9", 2, "remote", False),
    ]
    assert feed.position == {"t7": 6, "t9": 2}


async def test_backlog_across_origins_is_merged_by_hlc(
    make_node: NodeFactory, clock: FakeClock
) -> None:
    t7, t9 = await make_node("t7"), await make_node("t9")
    for i in range(20):
        clock.advance(1)
        await (t7 if i % 3 else t9).put((T7 if i % 3 else T9) + f"k{i}", i)
    await exchange(t9, t7)
    async with t7.follow(page_ops=4) as feed:
        items = await take(feed, 20)
    assert [it.value for it in items] == list(range(20))
    assert feed.max_held <= 4


async def test_prefix_filter_still_advances_the_position(make_node: NodeFactory) -> None:
    t7 = await make_node("t7")
    await t7.put_many([(T7 + "a/1", 1), (T7 + "b/1", 2), (T7 + "a/2", 3), (T7 + "b/2", 4)])
    async with t7.follow(prefixes=[T7 + "a/"]) as feed:
        got = await take(feed, 2)
        assert [it.value for it in got] == [1, 3]
        await t7.put(T7 + "b/3", 5)
        await t7.put(T7 + "a/3", 6)
        assert (await take(feed, 1))[0].value == 6
    assert feed.position == {"t7": 6}


async def test_rejected_ops_are_passed_over_unless_asked_for(make_node: NodeFactory) -> None:
    # A node that believes it owns t7's zone: its ops are stored as rejected on t7.
    rogue_fleet = Fleet(fleet_id=FLEET.fleet_id, authority="cloud", grants=(Grant.of(T7, "rogue"),))
    t7, rogue = await make_node("t7"), await make_node("rogue", fleet=rogue_fleet)
    await rogue.put(T7 + "x", "forged")
    await t7.put(T7 + "x", "genuine")
    await exchange(rogue, t7)
    assert [r[:2] for r in await t7.store.rejected()] == [("rogue", 1)]
    async with t7.follow() as feed:
        assert [it.value for it in await take(feed, 1)] == ["genuine"]
    async with t7.follow(include_rejected=True) as feed:
        items = await take(feed, 2)
    assert {(it.origin, it.value, it.rejected) for it in items} == {
        ("t7", "genuine", False),
        ("rogue", "forged", True),
    }


async def test_a_caught_up_follower_is_woken_by_a_rejected_only_commit(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(follow_mod, "IDLE_RECHECK_S", 3600.0)  # only the commit may wake it
    rogue_fleet = Fleet(fleet_id=FLEET.fleet_id, authority="cloud", grants=(Grant.of(T7, "rogue"),))
    t7, rogue = await make_node("t7"), await make_node("rogue", fleet=rogue_fleet)
    await t7.put(T7 + "x", "genuine")
    async with t7.follow(include_rejected=True) as feed:
        assert [it.value for it in await take(feed, 1)] == ["genuine"]
        waiting = asyncio.create_task(take(feed, 1))
        await asyncio.sleep(0)  # the follower is now caught up and idle
        await rogue.put(T7 + "x", "forged")
        await exchange(rogue, t7)  # commits one op, and it is rejected
        (item,) = await asyncio.wait_for(waiting, 10)
    assert (item.origin, item.rejected) == ("rogue", True)


async def test_resume_from_position_after_a_consumer_restart(make_node: NodeFactory) -> None:
    t7, t9 = await make_node("t7"), await make_node("t9")
    for i in range(15):
        await t7.put(T7 + f"k{i % 4}", i)
        await t9.put(T9 + f"k{i % 3}", i)
    await exchange(t9, t7)
    async with t7.follow(page_ops=4) as feed:
        first = await take(feed, 11)
        saved = feed.position
    assert sum(saved.values()) == 11
    async with t7.follow(since=saved, page_ops=4) as feed:
        rest = await take(feed, 19)
        assert feed.position == {"t7": 15, "t9": 15}
    everything = ids(first) + ids(rest)
    assert sorted(everything) == sorted(
        [("t7", i) for i in range(1, 16)] + [("t9", i) for i in range(1, 16)]
    )


async def test_resume_from_position_after_a_node_restart(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    path = tmp_path / "restart.db"
    t7 = await make_node("t7", path=path)
    await t7.put_many({T7 + f"k{i}": i for i in range(10)})
    async with t7.follow(page_ops=3) as feed:
        first = await take(feed, 4)
        saved = feed.position
    await t7.close()
    t7 = await make_node("t7", path=path)
    await t7.put_many({T7 + f"n{i}": 100 + i for i in range(3)})
    async with t7.follow(since=saved, page_ops=3) as feed:
        rest = await take(feed, 9)
        assert feed.position == {"t7": 13}
    assert [it.value for it in first + rest] == [*range(10), 100, 101, 102]


async def test_the_feed_ends_when_the_node_closes(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(follow_mod, "IDLE_RECHECK_S", 3600.0)  # the close itself must wake it
    t7 = await make_node("t7")
    await t7.put(T7 + "a", 1)
    feed = t7.follow()
    got: list[int] = []

    async def consume() -> None:
        async for item in feed:
            got.append(item.value)

    consumer = asyncio.create_task(consume())
    await wait_until(lambda: got == [1], what="the backlog")
    await t7.close()  # while the consumer waits for more
    await asyncio.wait_for(consumer, 10)
    assert got == [1]
    with pytest.raises(StopAsyncIteration):
        await anext(feed)


async def test_slow_consumer_gets_everything_and_holds_at_most_a_page(
    make_node: NodeFactory,
) -> None:
    t7 = await make_node("t7")
    for i in range(0, 10_000, 1000):
        await t7.put_many({T7 + f"k{j}": j for j in range(i, i + 1000)})
    page = 500
    seen: list[int] = []

    async def write_more() -> None:
        for i in range(10_000, 20_000, 100):
            await t7.put_many({T7 + f"k{j}": j for j in range(i, i + 100)})

    async with t7.follow(page_ops=page) as feed:
        writer = asyncio.create_task(write_more())
        while len(seen) < 20_000:
            item = await asyncio.wait_for(anext(feed), 10)
            seen.append(item.value)
            assert feed.held <= page
            if len(seen) % 50 == 0:
                await asyncio.sleep(0)  # a slow consumer lets the writer run ahead
        await writer
    assert seen == list(range(20_000))
    assert feed.max_held <= page
    assert feed.position == {"t7": 20_000}


async def test_a_position_ahead_of_the_node_is_refused(make_node: NodeFactory) -> None:
    t7 = await make_node("t7")
    await t7.put_many({T7 + f"k{i}": i for i in range(10)})
    with pytest.raises(syncfw.FeedPositionError) as err:
        t7.follow(since={"t7": 50, "zz": 3})
    assert err.value.missing == {"t7": (11, 50), "zz": (1, 3)}
    assert "t7 11..50" in str(err.value)


async def test_a_position_below_compaction_is_refused(make_node: NodeFactory) -> None:
    t7, t9 = await make_node("t7"), await make_node("t9")
    await t7.put_many({T7 + f"k{i}": i for i in range(10)})
    await exchange(t7, t9)
    await t7.acknowledge("t9", await t9.version_vector())
    assert await t7.compact() == 10
    await t7.put(T7 + "after", 11)
    for since, missing in (({}, {"t7": (1, 10)}), ({"t7": 4}, {"t7": (5, 10)})):
        feed = t7.follow(since=since)
        with pytest.raises(syncfw.FeedPositionError) as err:
            await anext(feed)
        assert err.value.missing == missing
        with pytest.raises(StopAsyncIteration):  # the feed ended, its connection closed
            await anext(feed)
    async with t7.follow(since={"t7": 10}) as feed:
        assert [it.value for it in await take(feed, 1)] == [11]


async def test_compaction_under_a_live_follower_raises_rather_than_skips(
    make_node: NodeFactory,
) -> None:
    t7, t9 = await make_node("t7"), await make_node("t9")
    await t7.put_many({T7 + f"k{i}": i for i in range(20)})
    async with t7.follow(page_ops=5) as feed:
        assert [it.seq for it in await take(feed, 3)] == [1, 2, 3]
        await exchange(t7, t9)
        await t7.acknowledge("t9", await t9.version_vector())
        await t7.compact()
        assert [it.seq for it in await take(feed, 2)] == [4, 5]  # already read: still exact
        with pytest.raises(syncfw.FeedPositionError) as err:
            await anext(feed)
        assert err.value.missing == {"t7": (6, 20)}
        assert feed.position == {"t7": 5}


_counter = itertools.count()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["write", "sync", "take", "resume", "restart"]), st.integers(0, 5)
        ),
        min_size=5,
        max_size=40,
    ),
    page=st.integers(1, 8),
)
async def test_any_interleaving_and_stop_points_give_every_op_once(
    make_node: NodeFactory, tmp_path: Path, steps: list[tuple[str, int]], page: int
) -> None:
    """Writes from 3 origins, syncs, and a consumer that stops and resumes anywhere."""
    run = next(_counter)
    rng = random.Random(run)
    path = tmp_path / f"target{run}.db"
    target = await make_node("a", path=path)
    others = [
        await make_node("b", path=tmp_path / f"b{run}.db"),
        await make_node("c", path=tmp_path / f"c{run}.db"),
    ]
    delivered: list[tuple[str, int]] = []
    feed = target.follow(page_ops=page)

    async def backlog() -> int:
        vv = await target.version_vector()
        return sum(vv.values()) - sum(feed.position.values())

    try:
        for action, n in steps:
            if action == "write":
                writer = rng.choice([target, *others])
                await writer.put_many(
                    {
                        f"site/{writer.node_id}/{rng.randint(0, 3)}": rng.random()
                        for _ in range(n + 1)
                    }
                )
            elif action == "sync":
                await exchange(rng.choice(others), target)
            elif action == "take":
                delivered += ids(await take(feed, min(n, await backlog())))
            elif action == "resume":
                saved = feed.position
                await feed.aclose()
                feed = target.follow(since=saved, page_ops=page)
            else:  # restart the node itself; the consumer resumes from its position
                saved = feed.position
                await feed.aclose()
                await target.close()
                target = await make_node("a", path=path)
                feed = target.follow(since=saved, page_ops=page)
        for other in others:
            await exchange(other, target)
        delivered += ids(await take(feed, await backlog()))
        assert feed.max_held <= max(page, 3)  # a merge needs one op of each origin
    finally:
        await feed.aclose()
        for node in (target, *others):
            await node.close()
    assert len(delivered) == len(set(delivered))
    vv = await _vv_of(path)
    assert sorted(delivered) == sorted((o, s) for o, top in vv.items() for s in range(1, top + 1))
    for origin in vv:
        seqs = [s for o, s in delivered if o == origin]
        assert seqs == sorted(seqs)


async def _vv_of(path: Path) -> dict[str, int]:
    node = await Node.open(path, node_id="a", fleet=FLEET)
    try:
        return await node.version_vector()
    finally:
        await node.close()


def _uneven_fleet(n_origins: int, seed: int, ticks: int = 20) -> list[Op]:
    """Ops of ``n_origins`` origins at very different rates, in bursts, as a fleet's
    edges commit them: each tick, origin i writes a burst with probability
    ~1/(1 + i % 5), of 1 to 10·(1 + i % 4) ops; every op's hlc is distinct."""
    rng = random.Random(seed)
    writers = {f"e{i:02}": OpWriter(f"e{i:02}") for i in range(n_origins)}
    ops: list[Op] = []
    t = (START_MS - 60_000) << 16
    for _tick in range(ticks):
        for i, (origin, w) in enumerate(writers.items()):
            if rng.random() * (1 + i % 5) > 1:
                continue
            for _ in range(rng.randint(1, 10 * (1 + i % 4))):
                t += rng.randint(1, 3)
                ops.append(w.write(f"k{rng.randint(0, 9)}", origin, hlc=t))
    return ops


async def test_many_origins_at_uneven_rates_are_paged_whole_in_hlc_order(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page carries whatever is ready across all origins: with 48 bursty origins
    and a 600-op page, pages stay nearly full (the old even split across origins,
    with a merge stopping at the first origin to run dry, read ~20 ops a page)."""
    agg = await make_node("agg")
    ops = _uneven_fleet(48, seed=7)
    by_origin: dict[str, list[Op]] = {}
    for op in ops:
        by_origin.setdefault(op.origin, []).append(op)
    for chain_ops in by_origin.values():  # each origin synced in whole, one after another
        for i in range(0, len(chain_ops), 500):
            await agg.apply_remote(chain_ops[i : i + 500])
    expected = sorted((op.hlc, op.origin, op.seq) for op in ops)
    assert len(by_origin) == 48 and len(expected) > 4000
    reads = 0
    real_read = Follow._read

    async def counted(self: Follow) -> bool:
        nonlocal reads
        reads += 1
        return await real_read(self)

    monkeypatch.setattr(Follow, "_read", counted)
    page = 600
    cut = len(expected) // 3
    async with agg.follow(page_ops=page) as feed:
        first = await take(feed, cut)
        saved = feed.position
        assert feed.max_held <= page
    async with agg.follow(since=saved, page_ops=page) as feed:
        rest = await take(feed, len(expected) - cut)
        assert feed.max_held <= page
        assert feed.held == 0
    got = [(it.hlc, it.origin, it.seq) for it in first + rest]
    assert got == expected  # global (hlc, origin, seq) order, each op once, across the resume
    # nearly full pages: the whole backlog in a few reads of 600 (the old code: ~250)
    assert reads <= 3 * (len(expected) // page + 2), reads


async def test_a_crowded_page_still_holds_one_op_per_origin_and_loses_nothing(
    make_node: NodeFactory,
) -> None:
    """More origins than a page: one op each is held, and every op still comes once."""
    agg = await make_node("agg")
    ops = _uneven_fleet(12, seed=3, ticks=6)
    for origin in sorted({op.origin for op in ops}):
        await agg.apply_remote([op for op in ops if op.origin == origin])
    async with agg.follow(page_ops=5) as feed:
        items = await take(feed, len(ops))
        assert feed.max_held <= 12
    assert [(it.hlc, it.origin, it.seq) for it in items] == sorted(
        (op.hlc, op.origin, op.seq) for op in ops
    )


# -- from memory when caught up (invariant 5a) ----------------------------------------


async def test_a_caught_up_follower_takes_each_commit_from_memory(make_node: NodeFactory) -> None:
    rogue_fleet = Fleet(fleet_id=FLEET.fleet_id, authority="cloud", grants=(Grant.of(T7, "rogue"),))
    t7, t9 = await make_node("t7"), await make_node("t9")
    rogue = await make_node("rogue", fleet=rogue_fleet)
    await t7.put_many({T7 + f"k{i}": i for i in range(5)})
    async with t7.follow() as feed:
        assert len(await take(feed, 5)) == 5
        reads = feed.pages_read
        for i in range(10):
            await t7.put(T7 + "live", i)
            (it,) = await take(feed, 1)
            assert (it.origin, it.seq, it.value, it.local) == ("t7", 6 + i, i, True)
        await t9.put_many({T9 + f"r{i}": i for i in range(3)})
        await exchange(t9, t7)  # a remote commit
        await rogue.put(T7 + "forged", 1)
        # a commit of one rejected op (one way: the rogue's fleet holds t9's ops back)
        await t7.apply_remote(await rogue.ops_since(await t7.version_vector()))
        got = await take(feed, 3)
        assert [(i.origin, i.seq, i.value, i.local) for i in got] == [
            ("t9", s, s - 1, False) for s in (1, 2, 3)
        ]
        await t7.put(T7 + "after", "x")
        (it,) = await take(feed, 1)  # the rejected op was passed over, as from SQLite
        assert (it.key, it.value) == (T7 + "after", "x")
        assert feed.position == {"t7": 16, "t9": 3, "rogue": 1}
        assert feed.pages_read == reads  # nothing was read back from SQLite
        assert feed.memo_pages >= 12  # the rogue commit and the next may make one page


async def test_a_commit_larger_than_a_page_is_read_from_sqlite(make_node: NodeFactory) -> None:
    t7 = await make_node("t7")
    async with t7.follow(page_ops=4) as feed:
        await t7.put(T7 + "a", 0)
        assert [it.value for it in await take(feed, 1)] == [0]
        reads = feed.pages_read
        await t7.put_many({T7 + f"k{i}": i for i in range(10)})  # 10 rows: over the memo's 4
        got = await take(feed, 10)
        assert [it.seq for it in got] == list(range(2, 12))
        assert feed.pages_read > reads
        assert feed.max_held <= 4
        await t7.put(T7 + "b", 1)  # caught up again: memory again
        reads = feed.pages_read
        assert [it.value for it in await take(feed, 1)] == [1]
        assert feed.pages_read == reads


async def test_commits_racing_reads_are_each_delivered_once_in_order(
    make_node: NodeFactory,
) -> None:
    """Local and remote commits land while the follower reads, pages, and waits."""
    a, b, c = await make_node("a"), await make_node("b"), await make_node("c")
    rng = random.Random(7)
    done = asyncio.Event()

    async def local() -> None:
        for i in range(120):
            n = rng.choice([1, 1, 2, 5, 9])
            await a.put_many({f"site/a/{i}/{j}": j for j in range(n)})
            if i % 7 == 0:
                await asyncio.sleep(0)

    async def remote() -> None:
        for i in range(60):
            src = rng.choice([b, c])
            await src.put_many({f"site/{src.node_id}/{i}/{j}": j for j in range(rng.randint(1, 6))})
            await exchange(src, a)

    delivered: list[tuple[str, int]] = []

    async def consume(feed: Follow) -> None:
        while not (done.is_set() and sum((await a.version_vector()).values()) == len(delivered)):
            try:
                item = await asyncio.wait_for(anext(feed), 0.5)
            except TimeoutError:
                continue
            delivered.append((item.origin, item.seq))

    async with a.follow(page_ops=8) as feed:
        consumer = asyncio.create_task(consume(feed))
        await asyncio.gather(local(), remote())
        done.set()
        await asyncio.wait_for(consumer, 30)
        assert feed.memo_pages > 0 and feed.pages_read > 1  # both paths were taken
        assert feed.max_held <= 8
    vv = await a.version_vector()
    assert len(delivered) == len(set(delivered))
    assert sorted(delivered) == sorted((o, s) for o, top in vv.items() for s in range(1, top + 1))
    for origin in vv:
        seqs = [s for o, s in delivered if o == origin]
        assert seqs == sorted(seqs)
