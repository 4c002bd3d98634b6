"""The store's side of the replica contract, and the figures it records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from conftest import NodeFactory
from test_store_remote import chain

from syncfw.log import OP_SIZE_OVERHEAD, Op, op_size, same_op
from syncfw.store import export


async def test_acks_only_move_forward_and_persist(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    await node.acknowledge("p", {"a": 5, "b": 1})
    await node.acknowledge("p", {"a": 2, "c": 3})
    assert await node.peer_ack("p") == {"a": 5, "b": 1, "c": 3}
    path = node.store.path
    await node.close()
    node = await make_node("depot", path=Path(path))
    assert await node.peer_ack("p") == {"a": 5, "b": 1, "c": 3}
    await node.acknowledge("p", {"a": 4})
    assert await node.peer_ack("p") == {"a": 5, "b": 1, "c": 3}


async def test_an_op_differing_only_in_sig_is_a_duplicate_and_the_first_copy_is_kept(
    make_node: NodeFactory,
) -> None:
    node = await make_node("depot")
    ops = chain("t7", 4)
    signed = [dataclasses.replace(op, sig=b"sig" + bytes([op.seq])) for op in ops]
    # in one batch: the first copy wins
    r = await node.apply_remote([ops[0], signed[0]])
    assert (r.applied, r.duplicates) == (1, 1)
    # held pending: a signed copy of a pending op is a duplicate too
    r = await node.apply_remote([signed[2]])
    assert r.pending == 1
    r = await node.apply_remote([ops[2]])
    assert (r.duplicates, r.pending) == (1, 1)
    # already stored
    r = await node.apply_remote([signed[0], ops[1]])
    assert (r.applied, r.duplicates) == (2, 1)
    held = await node.ops_since({})
    assert [op.sig for op in held[:3]] == [None, None, signed[2].sig]
    assert all(same_op(a, b) for a, b in zip(held, ops[:3], strict=True))


async def test_ops_since_is_contiguous_and_bounded(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    await node.apply_remote(chain("t7", 30) + chain("t9", 10))
    got = await node.ops_since({"t7": 12}, limit=25)
    assert len(got) == 25
    t7 = [op.seq for op in got if op.origin == "t7"]
    assert t7 == list(range(13, 31))
    assert [op.seq for op in got if op.origin == "t9"] == list(range(1, 8))
    cap = 5 * op_size(got[0])
    capped = await node.ops_since({}, max_bytes=cap)
    assert 1 <= len(capped) <= 5 and sum(op_size(op) for op in capped) <= cap
    assert len(await node.ops_since({}, max_bytes=1)) == 1  # always some progress


async def test_a_small_batch_of_a_long_backlog_reads_only_what_can_fit(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await make_node("depot")
    ops = chain("t7", 2000)
    await node.apply_remote(ops)
    hashed = 0
    real = export.op_hash

    def counting(op: Op) -> bytes:
        nonlocal hashed
        hashed += 1
        return real(op)

    monkeypatch.setattr(export, "op_hash", counting)
    cap = 20 * op_size(ops[0])
    got = await node.ops_since({"t7": 100}, limit=2000, max_bytes=cap)
    assert [op.seq for op in got] == list(range(101, 121))  # contiguous, within the cap
    # each op counts at least OP_SIZE_OVERHEAD bytes, so no more than cap // that is read
    assert hashed <= cap // OP_SIZE_OVERHEAD + 2, hashed
    # the whole rest, unbounded, is still read and verified to the chain head
    hashed = 0
    assert len(await node.ops_since({"t7": 100}, limit=5000)) == 1900 == hashed - 1


async def test_store_metrics_are_recorded_after_commit(make_node: NodeFactory) -> None:
    node = await make_node("depot")
    m = node.store.metrics
    ops = chain("t7", 6)
    foreign = chain("t9", 1, zone="trucks/t7/", epoch=1)  # t9 does not own trucks/t7/
    await node.apply_remote(ops[:2] + ops[3:] + foreign)
    await node.apply_remote(ops[:1])
    await node.put("site/x", 1)
    assert m.value("syncfw_ops_applied_total", source="remote") == 2
    assert m.value("syncfw_ops_applied_total", source="local") == 1
    assert m.value("syncfw_ops_rejected_total") == 1
    assert m.value("syncfw_ops_duplicate_total") == 1
    assert m.value("syncfw_ops_pending", reason="gap") == 3
    assert m.value("syncfw_commit_batch_ops_sum", source="remote") == 3
    await node.apply_remote(ops[2:3])
    assert m.value("syncfw_ops_pending", reason="gap") == 0
    st = await node.store.stats()
    assert m.value("syncfw_storage_bytes") == st.file_bytes > 0
