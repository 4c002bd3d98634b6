"""The aggregator's model side: it holds and serves release chunks like any node, and the
authority's aggregator decides its fleet's rollouts (promote, halt) on its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncfw.cloud import Aggregator, AggregatorConfig
from syncfw.keyfiles import add_node, init_fleet, load_node
from syncfw.models.rollout_ops import start_rollout
from syncfw.testing import wait_until

pytestmark = pytest.mark.asyncio


async def test_the_authoritys_aggregator_decides_rollouts_and_the_others_do_not(
    tmp_path: Path,
) -> None:
    root = tmp_path / "keys"
    init_fleet(root, "agg-models", authority="cloud")
    for n in ("cloud", "cloud-2"):
        add_node(root, n)
    cfg = AggregatorConfig.test()
    a = await Aggregator.open(tmp_path / "a.db", load_node(root, "cloud"), config=cfg)
    b = await Aggregator.open(tmp_path / "b.db", load_node(root, "cloud-2"), config=cfg)
    try:
        ma = await a.serve("127.0.0.1:0")
        await b.serve("127.0.0.1:0", [ma.address])
        assert a.models is not None and a.models.is_authority
        assert b.models is not None and not b.models.is_authority
        await start_rollout(a.node, "inspection", 1, stages=(50, 100))

        async def decided() -> bool:
            assert a.models is not None
            return "inspection:1" in a.models.advanced

        await wait_until(decided, what="the authority's decision on inspection 1")
        status = (await a.node.status())["models"]
        assert status["authority"] and "inspection:1" in status["rollout_decisions"]
        assert b.models.advanced == {}  # only the authority decides
    finally:
        await b.aclose()
        await a.aclose()


async def test_an_aggregator_without_a_model_side_starts_none(tmp_path: Path) -> None:
    root = tmp_path / "keys"
    init_fleet(root, "agg-models", authority="cloud")
    add_node(root, "cloud")
    cfg = AggregatorConfig(mesh=AggregatorConfig.test().mesh, models=None)
    a = await Aggregator.open(tmp_path / "a.db", load_node(root, "cloud"), config=cfg)
    try:
        await a.serve("127.0.0.1:0")
        assert a.models is None and "models" not in await a.node.status()
    finally:
        await a.aclose()
