"""``syncfw model status`` on a real node's file: the rollout and each node's step and reason;
bad input gets one clear line."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from syncfw.cli import main
from syncfw.models.lifecycle import Lifecycle
from syncfw.models.rollout_ops import start_rollout
from tests.test_models_lifecycle import cfg, open_node, publish_all, release


async def _setup(db: Path) -> None:
    key = Ed25519PrivateKey.generate()
    node, arts, engine = await open_node(db, key)
    await publish_all(arts, key)
    lc = Lifecycle(node, arts, engine, "inspection", cfg(window_s=0.0))
    await lc.update(await release(arts, 1))
    await start_rollout(node, "inspection", 3, stages=(5, 100), gate="accuracy>=-0.02")
    await lc.update(await release(arts, 3))
    await engine.aclose()
    await arts.aclose()
    await node.close()


def test_status_shows_the_rollout_and_who_rolled_back_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "n.db"
    asyncio.run(_setup(db))
    assert main(["model", "status", "inspection", "--db", str(db), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["rollouts"][0]["version"] == 3 and got["rollouts"][0]["stages"] == [5, 100]
    me = got["nodes"]["depot"]
    assert (me["step"], me["version"], me["serving_version"]) == ("rolled_back", 3, 1)
    assert "accuracy" in me["reason"]
    assert main(["model", "status", "inspection", "--db", str(db)]) == 0
    text = capsys.readouterr().out
    assert "rolled_back" in text and "depot" in text and "gate accuracy>=-0.02" in text
    assert main(["model", "status", "inspection", "--db", str(tmp_path / "none.db")]) == 2
    cap = capsys.readouterr()
    assert "no database file" in cap.out + cap.err
