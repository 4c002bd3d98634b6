"""The factory inspection example runs end to end (the bench: tests/test_bench_smoke.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
