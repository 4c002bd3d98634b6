"""Every benchmark script runs (small sizes) and ends with its JSON line of the named keys.

The figures themselves are not asserted: benchmarks measure, tests check behaviour.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CASES = {
    "acks": (
        ["--rounds", "3"],
        {f"{m}_{k}" for m in ("full", "normal")
         for k in ("acks_64_ms", "floor_one_txn_ms", "floor_64_txns_ms", "ratio")},
    ),
    "local_write": (
        ["--ops", "5000", "--repeat", "1", "--writers", "32", "--per-writer", "10"],
        {"floor_ops_per_s", "apply_ops_per_s", "put_ops_per_s", "put_p99_ms",
         "put_full_ops_per_s", "hlc_ns_per_op", "hlc_floor_ns_per_op", "put_floor_ops_per_s"},
    ),
    "sync_throughput": (
        ["--ops", "3000", "--repeat", "1"],
        {"ops_per_s", "floor_ops_per_s", "wire_bytes_per_op", "msgpack_bytes_per_op",
         "peak_rss_mb", "insync_bytes", "insync_round_trips", "diff10_bytes",
         "diff10_round_trips", "follow_ops_per_s", "follow_rss_mb", "receiver_apply_ops_per_s"},
    ),
    "convergence": (
        ["--seeds", "1"],
        {"rounds_8", "rounds_32", "rounds_128", "grpc16_heal_s", "neighbour_p99_ms"},
    ),
    "feed_remote": (
        ["--edges", "8", "--rate", "500", "--seconds", "3"],
        {"feed_remote_p50_ms", "feed_remote_p99_ms", "feed_remote_rate_ops_per_s",
         "feed_remote_delivered", "aggregator_cpu_per_s"},
    ),
    "hostile": (
        ["--quick"],
        {"honest_ok_ratio_min", "honest_p99_ms_worst", "honest_p99_ms_quiet",
         "rss_growth_mb_max", "cpu_ms_per_rejected_frame"},
    ),
    "snapshot": (
        ["--keys", "500", "--repeat", "1"],
        {"replay_join_s", "snapshot_join_s", "install_s", "floor_install_s",
         "snapshot_bytes_per_key", "snapshot_vs_replay", "install_vs_floor"},
    ),
    "inference": (
        ["--quick"],
        {"bare_p50_ms", "bare_p99_ms", "engine_p50_ms", "engine_p99_ms", "bare_items_per_s",
         "engine_items_per_s", "small_bare_items_per_s", "small_engine_items_per_s",
         "int8_p50_ms", "int8_accuracy"},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bench_script_ends_with_its_json_line(name: str) -> None:
    args, keys = CASES[name]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert keys <= set(figures), keys - set(figures)
    assert all(isinstance(figures[k], int | float) and figures[k] >= 0 for k in keys)
