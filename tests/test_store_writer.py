"""The writer queue: named priorities, FIFO within one, no starvation; group commit."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import NodeFactory
from test_store_remote import chain

from syncfw.log import Op
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
