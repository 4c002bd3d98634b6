"""Peers cannot fill the space a node's own writes need: with a size cap, remote ops
(rejected junk included) stop at the local reserve while local writes go on."""

from __future__ import annotations

import logging
import os

import pytest
from conftest import NodeFactory

from syncfw import StorageFullError, StoreConfig
from syncfw.testing import OpWriter


async def test_rejected_junk_from_invented_origins_never_blocks_own_writes(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    cfg = StoreConfig(max_bytes=4 << 20, local_reserve_bytes=1 << 20)
    node = await make_node("t7", config=cfg)
    refusals: list[str] = []
    for i in range(200):
        w = OpWriter(f"x{i}", "fleet/t7/")  # writes into t7's zone: rejected and recorded
        try:
            await node.apply_remote([w.write("junk", os.urandom(60_000).hex()[:60_000])])
        except StorageFullError as exc:
            refusals.append(str(exc))
    assert refusals
    assert all("kept for 't7'" in r for r in refusals), refusals[:1]
    assert node.store.discarded()["local_reserve"] == len(refusals)  # status and metric
    assert any("refused a remote batch" in r.getMessage() for r in caplog.records)
    st = await node.status()
    assert st["file_bytes"] < 4 << 20
    for i in range(20):  # the node's own writes still fit
        await node.put(f"fleet/t7/k{i}", "x" * 10_000)
    assert await node.get("fleet/t7/k19") == "x" * 10_000


async def test_no_cap_no_reserve(make_node: NodeFactory) -> None:
    node = await make_node("t7")
    for i in range(80):  # 4.8 MB of rejected junk: recorded, nothing refused
        w = OpWriter(f"x{i}", "fleet/t7/")
        res = await node.apply_remote([w.write("junk", "x" * 60_000)])
        assert res.rejected == 1
