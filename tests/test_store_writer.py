"""The writer queue: named priorities, FIFO within one, no starvation; group commit."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import pytest
from conftest import NodeFactory
from test_store_remote import chain

import syncfw
from syncfw.log import Op
from syncfw.store import sql
from syncfw.store.writer import Priority, WriteJob, WriterQueue


async def test_jobs_run_by_priority_then_in_queue_order() -> None:
    ran: list[str] = []

    async def commit(batch: list[WriteJob]) -> tuple[asyncio.Future[bool] | None, bool]:
        ran.append("+".join(w.key for w in batch))
        for w in batch:
            w.future.set_result(None)  # type: ignore[arg-type]
        return None, False

    q = WriterQueue(commit, max_batch=10)
    loop = asyncio.get_running_loop()
    waits: list[asyncio.Future[Any]] = []

    def call(name: str, prio: Priority) -> None:
        async def fn() -> None:
            ran.append(name)

        waits.append(asyncio.ensure_future(q.call(fn, prio)))

    call("m1", Priority.MAINTENANCE)
    call("r1", Priority.REMOTE)
    call("r2", Priority.REMOTE)
    await asyncio.sleep(0)  # let the calls enqueue (one loop turn, not a wait for time)
    writes = [WriteJob("lww", f"w{i}", "site/", 1, b"", loop.create_future()) for i in range(3)]
    q.put_writes(writes)
    q.start("test-writer")
    await asyncio.gather(*waits, *(w.future for w in writes))
    await q.close()
    assert ran == ["w0+w1+w2", "r1", "r2", "m1"]


async def test_a_lower_priority_job_is_passed_over_at_most_max_skips_times() -> None:
    async def commit(batch: list[WriteJob]) -> tuple[asyncio.Future[bool] | None, bool]:
        raise AssertionError("no writes here")

    q = WriterQueue(commit, max_batch=10, max_skips=2)
    ran: list[str] = []

    def fn(name: str) -> Any:
        async def run() -> None:
            ran.append(name)

        return run

    waits = [asyncio.ensure_future(q.call(fn("m"), Priority.MAINTENANCE))]
    waits += [asyncio.ensure_future(q.call(fn(f"l{i}"), Priority.LOCAL)) for i in range(5)]
    await asyncio.sleep(0)
    q.start("test-writer")
    await asyncio.gather(*waits)
    await q.close()
    assert ran == ["l0", "l1", "m", "l2", "l3", "l4"]


async def test_a_local_put_completes_while_a_large_remote_apply_is_queued(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    ops = chain("t7", 40_000)
    first = asyncio.ensure_future(node.apply_remote(ops[:20_000]))
    second = asyncio.ensure_future(node.apply_remote(ops[20_000:]))
    await asyncio.sleep(0)  # both batches are queued on the writer now
    op: Op = await node.put("site/x", 1)
    assert op.seq == 1
    assert not second.done()  # the put did not wait for the batch queued before it
    await asyncio.gather(first, second)
    assert (await node.version_vector())["t7"] == 40_000


async def test_group_commit_forms_batches_and_counts_them(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    await asyncio.gather(*(node.put(f"site/k{i}", i) for i in range(300)))
    m = node.store.metrics
    batches = m.value("syncfw_commit_batch_ops_count", source="local")
    assert m.value("syncfw_commit_batch_ops_sum", source="local") == 300
    assert 1 <= batches < 300  # writes ready together commit together
    assert m.value("syncfw_ops_applied_total", source="local") == 300


async def test_a_put_cancelled_while_it_commits_never_kills_the_writer(
    make_node: NodeFactory,
) -> None:
    import asyncio

    node = await make_node("t7")
    for r in range(40):
        tasks = [asyncio.ensure_future(node.put(f"fleet/t7/k{i}", i)) for i in range(50)]
        await asyncio.sleep((r % 8) * 0.0005)  # queued, planned, or committing
        for t in tasks[::2]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    op = await asyncio.wait_for(node.put("fleet/t7/after", 1), 5)  # the writer lives on
    assert await node.get("fleet/t7/after") == 1 and op.seq > 1
    await asyncio.wait_for(node.close(), 5)


# -- remote groups (writer invariant 4a) ---------------------------------------------


_holding: set[asyncio.Future[Any]] = set()


async def _held_writer(node: Any) -> asyncio.Event:
    """Keep the writer busy until the returned event is set, so what is queued meanwhile
    waits together."""
    release = asyncio.Event()
    started = asyncio.Event()

    async def hold() -> None:
        started.set()
        await release.wait()

    _holding.add(asyncio.ensure_future(node.store._call(hold, Priority.REMOTE)))
    await started.wait()
    return release


def _count_plans(node: Any) -> list[int]:
    """Wrap the store's planner entry: the number of ops of each plan it makes."""
    store = node.store
    sizes: list[int] = []
    inner = store._stage_remote

    async def counted(incoming: list[Op]) -> Any:
        sizes.append(len(incoming))
        return await inner(incoming)

    store._stage_remote = counted
    return sizes


async def test_remote_batches_waiting_together_commit_as_one_each_with_its_own_result(
    make_node: NodeFactory,
) -> None:
    node = await make_node("depot")
    sizes = _count_plans(node)
    batches = [chain(f"t{i}", 5 + i) for i in range(8)]
    release = await _held_writer(node)
    calls = [asyncio.ensure_future(node.apply_remote(b)) for b in batches]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*calls)
    assert sizes == [sum(len(b) for b in batches)]  # one plan for all eight
    assert [(r.applied, r.duplicates, r.rejected) for r in results] == [
        (len(b), 0, 0) for b in batches
    ]
    assert await node.version_vector() == {f"t{i}": 5 + i for i in range(8)}


async def test_a_bad_batch_in_a_group_fails_alone(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    good_a, good_b = chain("t1", 4), chain("t2", 3)
    bad = chain("t3", 4)
    bad[-1] = dataclasses.replace(bad[-1], prev=b"\x66" * 32)  # breaks t3's chain
    release = await _held_writer(node)
    calls = [asyncio.ensure_future(node.apply_remote(b)) for b in (good_a, bad, good_b)]
    await asyncio.sleep(0)
    release.set()
    got = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(got[1], syncfw.ChainError)
    assert [(r.applied, r.duplicates) for r in (got[0], got[2])] == [(4, 0), (3, 0)]
    vv = await node.version_vector()
    assert vv == {"t1": 4, "t2": 3}  # nothing of the bad batch, all of the others


async def test_overlapping_batches_in_a_group_count_each_op_once(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    ops = chain("t1", 10)
    await node.apply_remote(ops[:2])
    release = await _held_writer(node)
    # two peers relaying the same origin: 1-6 and 4-10 (1-2 already held); then a gap-closer
    calls = [asyncio.ensure_future(node.apply_remote(b)) for b in (ops[:6], ops[3:])]
    await asyncio.sleep(0)
    release.set()
    first, second = await asyncio.gather(*calls)
    assert (first.applied, first.duplicates) == (4, 2)
    assert (second.applied, second.duplicates) == (4, 3)
    assert first.applied + second.applied == 8
    assert (await node.version_vector())["t1"] == 10


async def test_remote_groups_keep_to_their_op_cap(make_node: NodeFactory) -> None:
    node = await make_node("depot", config=syncfw.StoreConfig(max_remote_group_ops=10))
    sizes = _count_plans(node)
    batches = [chain(f"t{i}", n) for i, n in enumerate((4, 4, 4, 12, 1))]
    release = await _held_writer(node)
    calls = [asyncio.ensure_future(node.apply_remote(b)) for b in batches]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*calls)
    assert sizes == [8, 4, 12, 1]  # 4+4 fit, a third 4 would not; 12 goes alone


# -- pipelined remote groups (writer invariant 4b) ------------------------------------


class _HeldCommit:
    """Holds the store's next transaction on the database thread until released, and
    counts the remote batches the store plans (``Store._stage_remote``) meanwhile.

    With ``fail=True`` the held transaction then fails inside SQLite (a statement on
    a table that is not there), so the store's real rollback path runs."""

    def __init__(self, node: Any, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> None:
        self.go = threading.Event()
        self.staged: list[int] = []
        self._planned = asyncio.Event()
        self._want = 0
        real_steps, held = sql.run_steps, [False]

        def steps(db: Any, todo: Any, *args: Any) -> Any:
            if held[0]:
                return real_steps(db, todo, *args)
            held[0] = True
            assert self.go.wait(10), "the test never released the held commit"
            extra = [("INSERT INTO no_such_table VALUES (?)", [(1,)])] if fail else []
            return real_steps(db, [*todo, *extra], *args)

        monkeypatch.setattr(sql, "run_steps", steps)
        store, stage = node.store, node.store._stage_remote

        async def counted(incoming: list[Op]) -> Any:
            got = await stage(incoming)
            self.staged.append(len(incoming))
            if len(self.staged) >= self._want:
                self._planned.set()
            return got

        monkeypatch.setattr(store, "_stage_remote", counted)

    async def planned(self, n: int) -> None:
        """Wait until the store has planned ``n`` batches."""
        self._want = n
        if len(self.staged) < n:
            self._planned.clear()
            await asyncio.wait_for(self._planned.wait(), 10)


async def test_the_next_remote_group_is_planned_while_one_commits_and_nobody_hears_first(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await make_node("depot")
    held = _HeldCommit(node, monkeypatch)
    a, b = chain("t1", 5), chain("t2", 3)
    fa = asyncio.ensure_future(node.apply_remote(a))
    await held.planned(1)  # a's commit is held on the database thread
    fb = asyncio.ensure_future(node.apply_remote(b))
    await held.planned(2)  # b was planned while a's commit is held
    assert not (fa.done() or fb.done())  # nobody answered before COMMIT
    assert await node.version_vector() == {}  # nor told: the committed vector
    held.go.set()
    ra, rb = await asyncio.wait_for(asyncio.gather(fa, fb), 10)
    assert (ra.applied, rb.applied) == (5, 3)
    assert await node.version_vector() == {"t1": 5, "t2": 3}
    assert await node.get("fleet/t2/k3") == 3


async def test_a_group_that_fails_to_commit_voids_the_one_planned_on_it(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await make_node("depot")
    held = _HeldCommit(node, monkeypatch, fail=True)
    a, b = chain("t1", 5), chain("t2", 3)
    fa = asyncio.ensure_future(node.apply_remote(a))
    await held.planned(1)
    fb = asyncio.ensure_future(node.apply_remote(b))
    await held.planned(2)  # b planned on top of a, which then fails to commit
    held.go.set()
    got = await asyncio.wait_for(asyncio.gather(fa, fb, return_exceptions=True), 10)
    assert isinstance(got[0], syncfw.StorageError), got[0]
    assert got[1].applied == 3  # b's first transaction wrote nothing; planned again, it did
    assert held.staged == [5, 3, 3]
    assert await node.version_vector() == {"t2": 3}  # nothing of a
    assert (await node.apply_remote(a)).applied == 5  # a, sent again, lands whole
    assert await node.version_vector() == {"t1": 5, "t2": 3}


async def test_pipeline_remote_off_plans_each_group_after_the_one_before_commits(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await make_node("depot", config=syncfw.StoreConfig(pipeline_remote=False))
    held = _HeldCommit(node, monkeypatch)
    fa = asyncio.ensure_future(node.apply_remote(chain("t1", 5)))
    await held.planned(1)
    fb = asyncio.ensure_future(node.apply_remote(chain("t2", 3)))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(held.planned(2), 0.3)  # waits for a's commit
    held.go.set()
    await asyncio.wait_for(asyncio.gather(fa, fb), 10)
    assert held.staged == [5, 3]


async def test_copies_planned_as_duplicates_of_a_group_that_failed_are_planned_again(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await make_node("depot")
    held = _HeldCommit(node, monkeypatch, fail=True)
    a = chain("t1", 5)
    fa = asyncio.ensure_future(node.apply_remote(a))
    await held.planned(1)
    # Another peer relays the same ops: planned against a's uncommitted ops they are
    # duplicates, which must not stand once a fails to commit.
    copy = asyncio.ensure_future(node.apply_remote(list(a)))
    await asyncio.sleep(0.05)  # its plan is reading a's stored copies, behind a's commit
    held.go.set()
    got = await asyncio.wait_for(asyncio.gather(fa, copy, return_exceptions=True), 10)
    assert isinstance(got[0], syncfw.StorageError), got[0]
    assert (got[1].applied, got[1].duplicates) == (5, 0), got[1]
    assert held.staged == [5, 5, 5]  # the copy: planned on a, then again on what committed
    assert await node.version_vector() == {"t1": 5}


async def _counter_in_two_groups(make_node: NodeFactory) -> tuple[list[Op], Any]:
    """Six ops of one counter (t1's, adding 1..6: 21) and a depot whose remote groups
    hold three ops at most, so the first three and the last three are two groups."""
    edge = await make_node("t1")
    for i in range(6):
        await edge.counter("fleet/t1/hits").add(i + 1)
    ops = await edge.ops_since({})
    return ops, await make_node("depot", config=syncfw.StoreConfig(max_remote_group_ops=3))


async def test_a_group_planned_during_a_commit_reads_the_state_that_commit_leaves(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One counter, its ops in two batches: the second batch's plan reads the counter's
    # state, which must be the one the first batch's commit leaves (the read queues
    # behind that commit, never before it).
    ops, node = await _counter_in_two_groups(make_node)
    held = _HeldCommit(node, monkeypatch)
    # Both queued at once, two groups: b is planned right after a's transaction starts.
    fa = asyncio.ensure_future(node.apply_remote(ops[:3]))
    fb = asyncio.ensure_future(node.apply_remote(ops[3:]))
    await held.planned(1)
    await asyncio.sleep(0.05)  # b's plan reads the counter's state: behind a's commit
    assert held.staged == [3]
    held.go.set()
    await asyncio.wait_for(asyncio.gather(fa, fb), 10)
    assert await node.counter("fleet/t1/hits").value() == 21


async def test_a_plan_made_across_the_failed_commit_it_built_on_never_commits(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # b's plan starts on a's uncommitted ops and reads state behind a's commit, which
    # then fails: b must be planned again on what committed (its ops then wait on the
    # gap a leaves), never committed as planned on a.
    ops, node = await _counter_in_two_groups(make_node)
    held = _HeldCommit(node, monkeypatch, fail=True)
    fa = asyncio.ensure_future(node.apply_remote(ops[:3]))
    fb = asyncio.ensure_future(node.apply_remote(ops[3:]))
    await held.planned(1)
    await asyncio.sleep(0.05)  # b's plan is reading the counter's state, behind a's commit
    held.go.set()
    got = await asyncio.wait_for(asyncio.gather(fa, fb, return_exceptions=True), 10)
    assert isinstance(got[0], syncfw.StorageError), got[0]
    assert (got[1].applied, got[1].pending) == (0, 3), got[1]  # held on the gap a left
    assert await node.version_vector() == {}
    assert (await node.apply_remote(ops[:3])).applied == 6  # a again: it and b's three
    assert await node.version_vector() == {"t1": 6}
    assert await node.counter("fleet/t1/hits").value() == 21
