"""bench/ydoc.py runs (small sizes) and ends with its JSON line of the issue's keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = {
    "edit_ms_small_doc",
    "edit_ms_5mb_doc",
    "wal_bytes_per_edit_5mb",
    "edit_update_bytes",
    "remote_apply_ops_per_s",
    "merge_floor_ops_per_s",
}


def test_ydoc_bench_ends_with_its_json_line() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ydoc.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(figures) >= KEYS, KEYS - set(figures)
    assert all(isinstance(figures[k], int | float) and figures[k] > 0 for k in KEYS)
