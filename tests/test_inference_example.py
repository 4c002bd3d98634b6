"""The factory inspection example and the inference bench run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_factory_inspection_survives_a_link_drop(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/factory_inspection/run.py"),
            "--seconds",
            "2",
            "--rate",
            "100",
            "--db",
            str(tmp_path / "station.db"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "full -> degraded (offline)" in out.stdout
    assert "degraded -> full" in out.stdout
    assert "full -> minimal  (battery low)" in out.stdout
    assert "inspection  CPUExecutionProvider  total" in out.stdout
    assert (tmp_path / "station.db").exists()


@pytest.mark.slow
def test_bench_quick_run_ends_with_its_json_line() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench/inference.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    last = json.loads(out.stdout.strip().splitlines()[-1])
    for key in (
        "bare_p50_ms",
        "bare_p99_ms",
        "engine_p50_ms",
        "engine_p99_ms",
        "bare_items_per_s",
        "engine_items_per_s",
        "small_bare_items_per_s",
        "small_engine_items_per_s",
    ):
        assert last[key] > 0, key
