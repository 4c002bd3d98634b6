"""``syncfw model publish``, ``rollout --keys`` and ``fetch --db --seed`` on real files and a
real node process: the manifest is signed and printed, the chunks lie beside the database,
versions only move forward, a rollout is written once, and a fetch over mTLS gRPC brings
every chunk from the running depot."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

from syncfw import Fleet, Node
from syncfw.cli import main
from syncfw.inference.train import MODEL_PATH
from syncfw.keyfiles import load_fleet, load_node
from syncfw.models import ChunkStore
from tests.test_cli_model_serve import FLEET, _cli, _serve, _stop


async def _make_db(db: Path, keys: Path, node: str) -> None:
    fleet = load_fleet(keys).bind(Fleet(fleet_id=FLEET, authority="depot"))
    async with Node.open(db, node_id=node, fleet=fleet, keys=load_node(keys, node)):
        pass


async def test_publish_rollout_and_fetch_on_files_and_a_running_depot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", "init-fleet", str(keys), "--fleet", FLEET, "--authority", "depot"]) == 0
    for n in ("depot", "t1"):
        assert main(["keys", "add-node", str(keys), n]) == 0
    depot_db, t1_db = tmp_path / "depot.db", tmp_path / "t1.db"
    await _make_db(depot_db, keys, "depot")
    await _make_db(t1_db, keys, "t1")
    capsys.readouterr()
    publish = ["model", "publish", str(MODEL_PATH), "--db", str(depot_db), "--keys", str(keys),
               "--name", "inspection", "--chunk-size", str(16 << 10), "--version"]
    code, out, err = await asyncio.to_thread(_cli, [*publish, "1"], capsys)
    assert code == 0, out + err
    m = json.loads(out)
    assert (m["name"], m["version"], m["size"]) == ("inspection", 1, MODEL_PATH.stat().st_size)
    assert m["chunks"] == -(-m["size"] // (16 << 10)) and m["canary_accuracy"] == pytest.approx(0.96)
    store = ChunkStore(f"{depot_db}.chunks")
    assert len(store) == m["chunks"] and store.used_bytes == m["size"]
    # versions only move forward; a file a node holds is refused with the way round it
    code, out, _ = await asyncio.to_thread(_cli, [*publish, "1"], capsys)
    assert code == 2 and "versions only move forward" in out
    # rollout on the file, with --keys; once only; without --keys a clear refusal
    rollout = ["model", "rollout", "inspection", "1", "--db", str(depot_db), "--stages", "50,100"]
    code, out, err = await asyncio.to_thread(_cli, [*rollout, "--keys", str(keys)], capsys)
    assert code == 0, out + err
    assert json.loads(out)["stages"] == [50, 100]
    code, out, _ = await asyncio.to_thread(_cli, [*rollout, "--keys", str(keys)], capsys)
    assert code == 2 and "already exists" in out
    code, out, _ = await asyncio.to_thread(_cli, rollout, capsys)
    assert code == 2 and "--keys" in out
    code, out, _ = await asyncio.to_thread(_cli, ["model", "rollout", "inspection", "1", "--keys", str(keys)], capsys)
    assert code == 2 and "one of them" in out
    # a truck's file fetches the release from the running depot, with the bar off
    depot = await _serve(depot_db, "depot", keys)
    try:
        code, out, _ = await asyncio.to_thread(_cli, [
            "model", "publish", str(MODEL_PATH), "--db", str(depot_db), "--keys", str(keys),
            "--name", "inspection", "--version", "2", "--no-canary"], capsys)
        assert code == 2 and "a node runs on it" in out and depot.admin in out
        code, out, err = await asyncio.to_thread(_cli, [
            "model", "fetch", "inspection", "1", "--db", str(t1_db), "--seed", depot.address,
            "--keys", str(keys), "--quiet", "--timeout", "60"], capsys)
        assert code == 0, err
        got = json.loads(out)
        assert got["done"] and got["held"] == m["chunks"] and got["resumed"] == 0
        assert got["by_peer"] == {"depot": m["size"]}
        # again: every chunk is held, nothing is fetched
        code, out, err = await asyncio.to_thread(_cli, [
            "model", "fetch", "inspection", "--db", str(t1_db), "--seed", depot.address,
            "--keys", str(keys), "--quiet", "--timeout", "60"], capsys)
        assert code == 0, err
        again = json.loads(out)
        assert again["resumed"] == m["chunks"] and again["bytes_in"] == 0
    finally:
        rc, err = await _stop(depot)
    assert rc == 0, err[-2000:]
    assert ChunkStore(f"{t1_db}.chunks").used_bytes == m["size"]
