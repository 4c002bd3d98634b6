"""Rejected ops have a budget of their own, in bytes (``StoreConfig.max_rejected_bytes``).

A rejected op is stored (it is part of its origin's chain, and relayed so every
replica records the same rejection), so a peer writing junk into zones it does
not own would otherwise grow the file without bound. Past the budget the
origin waits, bounded by the pending caps, and says so; everyone else applies.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import NodeFactory

from syncfw.store import StoreConfig
from syncfw.testing.ops import OpWriter


async def test_rejected_ops_past_their_budget_wait_and_honest_ops_apply(
    make_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = StoreConfig(max_rejected_bytes=2_000, pending_warn_ops=5)
    node = await make_node("depot", config=cfg)
    junk = OpWriter("t9", zone="fleet/t7/")  # t9 writing in t7's zone: every op rejected
    honest = OpWriter("t7")
    ops = [junk.write(f"k{i}", "x" * 200) for i in range(30)]
    with caplog.at_level(logging.WARNING, "syncfw.store"):
        got = await node.apply_remote([*ops, honest.write("odometer", 1234)])
    # about 2,000 bytes of ~290-byte rejections stored, the rest held; t7's op applied
    assert 4 <= got.rejected <= 7, got
    assert got.applied == 1 and await node.get("fleet/t7/odometer") == 1234
    status = await node.status()
    assert status["pending_by_reason"].get("rejected_budget") == 30 - got.rejected
    assert (await node.version_vector())["t9"] == got.rejected
    assert "the rejected-op budget (StoreConfig.max_rejected_bytes" in caplog.text
    rejected = await node.store.rejected()
    assert len(rejected) == got.rejected
    # more junk is held, never stored: the file does not grow with it
    more = [junk.write(f"m{i}", "y" * 200) for i in range(20)]
    again = await node.apply_remote(more)
    assert again.rejected == 0 and len(await node.store.rejected()) == got.rejected
    await node.close()
    # a node given a larger budget takes the held ones in turn (they stay rejected)
    bigger = await make_node(
        "depot", config=StoreConfig(max_rejected_bytes=1 << 20), path=tmp_path / "depot.db"
    )
    res = await bigger.store.retry_pending()
    assert res.rejected > 0
    assert (await bigger.version_vector())["t9"] > got.rejected
