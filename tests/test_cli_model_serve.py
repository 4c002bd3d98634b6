"""The model lifecycle in real ``syncfw node serve`` processes, driven only by the CLI: the
authority publishes through its admin endpoint, trucks with ``--model inspection`` follow
the rollout for their stage, fetch from peers over mTLS gRPC, validate, activate, watch
and commit; the bad variant is rolled back on its canary truck, the authority halts the
rollout on its own, the other truck never runs it; ``syncfw model status ADDR`` shows it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("onnxruntime")

from syncfw.cli import build_parser, main
from syncfw.inference.train import MODEL_PATH
from syncfw.models.rollout import Plan, in_stage, parse_gate
from syncfw.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent
BAD = MODEL_PATH.with_name("inspection_bad.onnx")
FLEET = "yard"
STAGES = (50, 100)


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    address: str
    admin: str


async def _serve(db: Path, node: str, keys: Path, *extra: str) -> Served:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncfw", "node", "serve", str(db), "--id", node,
        "--fleet", FLEET, "--authority", "depot", "--keys", str(keys), "--preset", "test",
        *extra,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        first = (await proc.stdout.readline()).decode()
        second = (await proc.stdout.readline()).decode()
    assert first.startswith("listening ") and second.startswith("admin http://"), (first, second)
    return Served(proc, first.split()[1], second.split("http://")[1].strip())


async def _stop(s: Served) -> tuple[int, str]:
    if s.proc.returncode is None:
        s.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        _, err = await s.proc.communicate()
    return s.proc.returncode or 0, err.decode()


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args: argparse.Namespace = build_parser().parse_args(argv)
    code = int(args.func(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _pick_trucks() -> tuple[str, str]:
    """One truck in the first stage (the canary) and one only in the last."""
    plan = Plan("inspection", 2, STAGES, parse_gate("accuracy>=-0.02"))
    ids = [f"truck{i}" for i in range(64)]
    canary = next(n for n in ids if in_stage(plan, 0, n))
    later = next(n for n in ids if not in_stage(plan, 0, n))
    return canary, later


async def test_node_serve_runs_the_lifecycle_good_release_everywhere_bad_one_halted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    canary, later = _pick_trucks()
    assert main(["keys", "init-fleet", str(keys), "--fleet", FLEET, "--authority", "depot"]) == 0
    for n in ("depot", canary, later):
        assert main(["keys", "add-node", str(keys), n]) == 0
    capsys.readouterr()
    depot = await _serve(tmp_path / "depot.db", "depot", keys)
    trucks: dict[str, Served] = {}
    try:
        for n in (canary, later):
            trucks[n] = await _serve(tmp_path / f"{n}.db", n, keys, "--seed", depot.address,
                                     "--model", "inspection", "--model-window-s", "0.5")

        async def status() -> dict[str, Any]:
            code, out, err = await asyncio.to_thread(
                _cli, ["model", "status", "inspection", depot.admin, "--json"], capsys)
            assert code == 0, err
            got: dict[str, Any] = json.loads(out)
            return got

        # v1: published through the running authority, rolled out to all in two stages
        code, out, err = await asyncio.to_thread(_cli, [
            "model", "publish", str(MODEL_PATH), depot.admin, "--name", "inspection",
            "--version", "1", "--keys", str(keys), "--chunk-size", str(16 << 10)], capsys)
        assert code == 0, out + err
        published = json.loads(out)
        assert published["version"] == 1 and published["chunks"] > 1
        assert published["canary_accuracy"] == pytest.approx(0.96)
        assert Path(published["chunk_folder"]) == Path(f"{tmp_path / 'depot.db'}.chunks")
        code, out, err = await asyncio.to_thread(_cli, [
            "model", "rollout", "inspection", "1", depot.admin, "--stages", "50,100"], capsys)
        assert code == 0, out + err

        async def committed(version: int) -> bool:
            nodes = (await status())["nodes"]
            return all(nodes.get(n, {}).get("step") == "committed"
                       and nodes[n]["version"] == version for n in trucks)

        await wait_until(lambda: committed(1),
                         what="both trucks commit v1", timeout_s=120, interval_s=0.5)
        # the fetch is visible: a truck's status names its sources (the depot, or a peer)
        code, out, err = await asyncio.to_thread(
            _cli, ["model", "fetch", "inspection", "1", trucks[later].admin, "--quiet"], capsys)
        assert code == 0, err
        f = json.loads(out)
        assert f["done"] is True and f["version"] == 1
        assert f.get("held_before") or set(f["by_peer"]) <= {"depot", canary}

        # v2 is the bad variant: caught on its canary truck, the rollout halted
        code, out, err = await asyncio.to_thread(_cli, [
            "model", "publish", str(BAD), depot.admin, "--name", "inspection", "--version",
            "2", "--keys", str(keys), "--chunk-size", str(16 << 10)], capsys)
        assert code == 0, out + err
        code, out, err = await asyncio.to_thread(_cli, [
            "model", "rollout", "inspection", "2", depot.admin, "--stages", "50,100"], capsys)
        assert code == 0, out + err

        async def halted() -> bool:
            st = await status()
            r = {x["version"]: x for x in st["rollouts"]}.get(2)
            return r is not None and r["halted"]

        await wait_until(halted, what="the authority halts v2", timeout_s=120, interval_s=0.5)
        nodes = (await status())["nodes"]
        bad = nodes[canary]
        assert (bad["step"], bad["version"], bad["serving_version"]) == ("rolled_back", 2, 1)
        assert "accuracy" in bad["reason"]
        ok = nodes[later]  # never ran v2
        assert (ok["step"], ok["version"], ok["serving_version"]) == ("committed", 1, 1)
        code, text, _ = await asyncio.to_thread(
            _cli, ["model", "status", "inspection", trucks[later].admin], capsys)
        assert code == 0 and "HALTED" in text and canary in text and "rolled_back" in text
        # publishing backwards through the endpoint is refused, naming the rule
        code, out, err = await asyncio.to_thread(_cli, [
            "model", "publish", str(MODEL_PATH), depot.admin, "--name", "inspection",
            "--version", "2", "--keys", str(keys), "--no-canary"], capsys)
        assert code == 2 and "versions only move forward" in out
    finally:
        results = [await _stop(s) for s in (*trucks.values(), depot)]
    for code, err in results:
        assert code == 0, err[-3000:]
