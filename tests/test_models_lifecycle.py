"""The node's model update state machine on real nodes (SQLite files, the chunk store, ONNX
Runtime): a good model goes active and commits with no call dropped by the swap; the bad
variant is caught by the accuracy gate and rolled back with its reason as an op; a
regression in the watch window rolls back; a SIGKILL at every step comes back serving a
valid model with a consistent state op."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from syncfw import Fleet, Node
from syncfw.inference.engine import Engine
from syncfw.inference.train import CANARY_PATH, MODEL_PATH
from syncfw.keyfiles import NodeKeys
from syncfw.keys import model_key
from syncfw.mesh.models import read_fleet_models
from syncfw.models import ArtifactConfig, Artifacts
from syncfw.models.lifecycle import (
    PRE_ACTIVE,
    Lifecycle,
    LifecycleConfig,
    Record,
    lifecycle_key,
    read_records,
)
from syncfw.models.rollout import State, parse_gate
from syncfw.trust.statements import public_key_bytes

BAD_PATH = MODEL_PATH.with_name("inspection_bad.onnx")
NODE = "depot"
FLEET_ID = "lc"
GATE = parse_gate("accuracy>=-0.02,error_rate<=0.01,p99_ms<=500")
CHUNK = 16 << 10


def variant(data: bytes, note: str) -> bytes:
    """The same model with other bytes (a metadata entry): a new release, same behaviour."""
    import onnx

    proto = onnx.load_model_from_string(data)
    e = proto.metadata_props.add()
    e.key, e.value = "release_note", note
    out: bytes = proto.SerializeToString()
    return out


def fleet_of(key: Ed25519PrivateKey) -> tuple[Fleet, NodeKeys]:
    pub = public_key_bytes(key)
    fleet = Fleet(fleet_id=FLEET_ID, authority=NODE, authority_key=pub)
    return fleet, NodeKeys(FLEET_ID, NODE, pub, NODE, key, b"", b"", b"", b"")


async def open_node(db: Path, key: Ed25519PrivateKey) -> tuple[Node, Artifacts, Engine]:
    fleet, keys = fleet_of(key)
    node = await Node.open(db, node_id=NODE, fleet=fleet, keys=keys)
    arts = Artifacts.attach(node, None, config=ArtifactConfig(durable=True))
    return node, arts, Engine(node)


def frames(n: int) -> list[Any]:
    x = np.load(CANARY_PATH)["x"][:n]
    return [(x[i : i + 1].astype(np.float32) / 255.0) for i in range(len(x))]


async def publish_all(arts: Artifacts, key: Ed25519PrivateKey) -> None:
    good = MODEL_PATH.read_bytes()
    for version, data in ((1, good), (2, variant(good, "v2")), (3, BAD_PATH.read_bytes())):
        await arts.publish(data, name="inspection", version=version, key=key, chunk_size=CHUNK)


def cfg(**kw: Any) -> LifecycleConfig:
    base: dict[str, Any] = {"gate": GATE, "window_s": 0.3, "check_every_s": 0.05,
                            "min_window_calls": 5}
    return LifecycleConfig(**(base | kw))


async def release(arts: Artifacts, v: int) -> Any:
    m = await arts.release("inspection", v)
    assert m is not None
    return m


async def test_a_good_model_goes_active_and_commits_and_the_swap_drops_no_call(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    node, arts, engine = await open_node(tmp_path / "n.db", key)
    try:
        await publish_all(arts, key)
        steps: list[str] = []
        lc = Lifecycle(node, arts, engine, "inspection", cfg(), on_step=lambda r: steps.append(r.step))
        r1 = await lc.update(await release(arts, 1))
        assert r1.step == "committed" and r1.serving_version == 1
        assert steps == ["downloading", "verifying", "loading", "validating", "activating",
                         "active", "committed"]
        # v2 under load: every call during the swap is served
        stop = asyncio.Event()
        served: dict[str, int] = {}
        errors: list[BaseException] = []

        async def load() -> None:
            xs = frames(16)
            i = 0
            while not stop.is_set():
                try:
                    res = await engine.infer(xs[i % len(xs)])
                    served[res.model.version] = served.get(res.model.version, 0) + 1
                except Exception as exc:  # any failure is a dropped call
                    errors.append(exc)
                i += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(load())
        r2 = await lc.update(await release(arts, 2))
        stop.set()
        await task
        assert errors == []
        assert served.get("1", 0) > 0 and served.get("2", 0) > 0, served
        assert r2.step == "committed" and r2.version == 2
        assert (r2.serving_version, r2.prev_version) == (2, 1)
        assert r2.accuracy is not None and r2.accuracy_delta == pytest.approx(0.0, abs=1e-9)
        assert r2.error_rate == 0.0
        assert engine.model is not None and engine.model.sha256 == r2.sha256
        # the fleet sees it: the state op and the running-model view
        stored = Record.of(await node.get(lifecycle_key(NODE, "inspection")))
        assert stored == r2
        assert (await read_records(node, "inspection"))[NODE].report(NODE).state is State.COMMITTED
        view = await read_fleet_models(node)
        assert view.nodes[NODE].version == "2" and view.nodes[NODE].status == "active"
        assert (await node.get(model_key(NODE)))["sha256"] == r2.sha256
        # the previous model stays on disk
        assert arts.held(await release(arts, 1))
        # a done version is not run again
        assert await lc.update(await release(arts, 2)) == r2
    finally:
        await engine.aclose()
        await arts.aclose()
        await node.close()


async def test_the_bad_variant_is_caught_by_the_accuracy_gate_and_rolled_back(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    node, arts, engine = await open_node(tmp_path / "n.db", key)
    try:
        await publish_all(arts, key)
        lc = Lifecycle(node, arts, engine, "inspection", cfg())
        await lc.update(await release(arts, 2))
        served = engine.model
        assert served is not None
        bad = await lc.update(await release(arts, 3))
        assert bad.step == "rolled_back" and bad.state is State.ROLLED_BACK
        assert "accuracy>=-0.02" in bad.reason and bad.accuracy_delta is not None
        assert bad.accuracy_delta < -0.1
        assert (bad.serving_version, bad.serving_sha256) == (2, served.sha256)
        # the old model never stopped serving; the reason is an op the fleet reads
        assert engine.model is not None and engine.model.sha256 == served.sha256
        rep = (await read_records(node, "inspection"))[NODE].report(NODE)
        assert rep.state is State.ROLLED_BACK and rep.version == 3 and "gate" in rep.reason
        assert (await node.get(model_key(NODE)))["version"] == "2"
        # a rolled-back version is never tried again
        assert (await lc.update(await release(arts, 3))).step == "rolled_back"
    finally:
        await engine.aclose()
        await arts.aclose()
        await node.close()


async def test_a_regression_in_the_watch_window_rolls_back_to_the_previous_model(
    tmp_path: Path,
) -> None:
    key = Ed25519PrivateKey.generate()
    node, arts, engine = await open_node(tmp_path / "n.db", key)
    try:
        await publish_all(arts, key)
        lc = Lifecycle(node, arts, engine, "inspection", cfg(window_s=0.3))
        await lc.update(await release(arts, 1))
        v1 = engine.model
        assert v1 is not None

        async def failing_calls() -> None:
            nan = np.full((1, 1, 16, 16), np.nan, dtype=np.float32)
            while True:
                with pytest.raises(Exception):
                    await engine.infer(nan)
                await asyncio.sleep(0.005)

        lc.config = cfg(window_s=5.0)
        lc2 = lc

        active = asyncio.Event()
        lc.on_step = lambda r: active.set() if r.step == "active" else None
        task = asyncio.create_task(lc2.update(await release(arts, 2)))
        await asyncio.wait_for(active.wait(), 10)
        noise = asyncio.create_task(failing_calls())
        rec = await asyncio.wait_for(task, 10)
        noise.cancel()
        assert rec.step == "rolled_back", rec
        assert "watch window" in rec.reason and "error_rate" in rec.reason
        assert engine.model is not None and engine.model.sha256 == v1.sha256
        assert rec.serving_version == 1
    finally:
        await engine.aclose()
        await arts.aclose()
        await node.close()


# ---------------------------------------------------------------------- power cuts

CHILD = r"""
import asyncio, json, os, signal, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
sys.path.insert(0, {tests!r})
import test_models_lifecycle as t
from syncfw.models.lifecycle import Lifecycle

async def main(db, keyfile, target, kill_at):
    key = Ed25519PrivateKey.from_private_bytes(Path(keyfile).read_bytes())
    node, arts, engine = await t.open_node(Path(db), key)

    def hook(rec):
        if rec.step == kill_at and rec.version == target:
            os.kill(os.getpid(), signal.SIGKILL)

    lc = Lifecycle(node, arts, engine, "inspection", t.cfg(window_s=0.2), on_step=hook)
    rec = await lc.recover()
    if rec is None or rec.version < target:
        rec = await lc.update(await t.release(arts, target))
    model = engine.model
    out = {{"record": rec.value(), "serving": None if model is None else model.sha256}}
    print(json.dumps(out))
    await engine.aclose(); await arts.aclose(); await node.close()

asyncio.run(main(*sys.argv[1:3], int(sys.argv[3]), sys.argv[4]))
"""


def run_child(tmp: Path, db: Path, target: int, kill_at: str) -> subprocess.CompletedProcess[str]:
    script = tmp / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    return subprocess.run(
        [sys.executable, str(script), str(db), str(tmp / "key"), str(target), kill_at],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.fixture(scope="module")
def base_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Ed25519PrivateKey]:
    """A node with v1 committed and v2 (good) and v3 (bad) published, closed cleanly."""
    tmp = tmp_path_factory.mktemp("base")
    key = Ed25519PrivateKey.generate()
    (tmp / "key").write_bytes(key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption()))

    async def setup() -> None:
        node, arts, engine = await open_node(tmp / "n.db", key)
        await publish_all(arts, key)
        lc = Lifecycle(node, arts, engine, "inspection", cfg(window_s=0.0))
        assert (await lc.update(await release(arts, 1))).step == "committed"
        await engine.aclose()
        await arts.aclose()
        await node.close()

    asyncio.run(setup())
    return tmp, key


KILL_POINTS = [(2, s) for s in (*PRE_ACTIVE, "active", "committed")] + [
    (3, s) for s in ("validating", "rolled_back")
]
# each point is two interpreter starts: three by default, every step under -m slow
SHORT = {(2, "verifying"), (2, "active"), (3, "rolled_back")}


@pytest.mark.parametrize(("target", "kill_at"), [
    pytest.param(t, s, id=f"v{t}-{s}", marks=() if (t, s) in SHORT else pytest.mark.slow)
    for t, s in KILL_POINTS
])
def test_a_sigkill_at_every_step_comes_back_serving_a_valid_model(
    tmp_path: Path, base_db: tuple[Path, Ed25519PrivateKey], target: int, kill_at: str
) -> None:
    base, _ = base_db
    for f in base.iterdir():
        (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp_path / f.name)
    db = tmp_path / "n.db"
    killed = run_child(tmp_path, db, target, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    back = run_child(tmp_path, db, target, "never")
    assert back.returncode == 0, back.stderr[-3000:]
    out = json.loads(back.stdout.strip().splitlines()[-1])
    rec = Record.of(out["record"])
    assert rec is not None and rec.version == target
    # consistent: a final step, and the engine serves exactly what the record says
    assert out["serving"] == rec.serving_sha256
    if target == 2:
        assert rec.step == "committed" and rec.serving_version == 2, rec
    else:
        assert rec.step == "rolled_back" and rec.serving_version == 1, rec
        assert "gate" in rec.reason
    assert rec.attempt <= 1
