"""bench/aggregator.py runs (small sizes) and ends with its JSON line of the named keys.

The figures are not asserted: benchmarks measure; the feed's delivery is (every op the
aggregator applied reached the gRPC consumer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_aggregator_bench_quick() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "aggregator.py"), "--quick", "--phases"],
        capture_output=True, text=True, timeout=180, check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"ingest_ops_per_s", "floor_ops_per_s", "ingest_ratio", "feed_p99_ms",
            "feed_rate_ops_per_s", "rss_growth_mb", "ingest_cold_ops_per_s",
            "ingest_cold_ratio", "ingest_cpu_s_aggregator_main", "ingest_cpu_s_edges_main",
            "ingest_writer_busy_s"} <= set(figures)
    assert figures["ingest_ops_per_s"] > 0 and figures["ingest_cold_ops_per_s"] > 0
    # one writer: busy at most the ingest (and a job that began before it)
    assert 0 < figures["ingest_writer_busy_s"] <= figures["ingest_s"] + 0.5
    assert figures["feed_delivered"] == figures["feed_applied"] > 0
    for where in ("ingest", "floor"):  # --phases: the writer's steps, per op
        assert figures[f"phase_{where}_groups"] >= 1
        plan, txn, steps = (figures[f"phase_{where}_{k}_us_per_op"] for k in ("plan", "txn", "steps"))
        assert plan > 0 and txn >= steps > 0  # the transaction holds its statements


def test_aggregator_bench_feed_only() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "aggregator.py"), "--feed-only", "--edges", "8",
         "--rate", "500", "--seconds", "2"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"feed_only_p50_ms", "feed_only_p99_ms", "feed_only_rate_ops_per_s"} <= set(figures)
    assert figures["feed_only_delivered"] == figures["feed_only_applied"] > 0


def test_aggregator_bench_breakdown() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "aggregator.py"), "--breakdown", "--edges", "4",
         "--backlog", "60", "--phases"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"inproc_node_ops_per_s", "inproc_aggregator_ops_per_s", "exchange_cpu_ms_1_op",
            "exchange_cpu_ms_backlog", "exchange_cpu_us_per_op"} <= set(figures)
    assert figures["exchange_backlog_ops"] == 60
    assert figures["inproc_node_ops_per_s"] > 0 and figures["inproc_aggregator_ops_per_s"] > 0
    assert figures["phase_inproc_groups"] >= 1  # --phases: the in-process aggregator's writer
    assert figures["phase_inproc_plan_us_per_op"] > 0
    assert figures["phase_inproc_txn_us_per_op"] >= figures["phase_inproc_steps_us_per_op"] > 0
