"""``syncfw demo`` runs a signed fleet over mutual TLS by default; ``--insecure`` runs without,
and a summary check that fails makes the demo exit 1."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from syncfw.cli import demo as demo_cmd
from syncfw.cli import main
from syncfw.cli.demo_acts import Ledger
from syncfw.cli.demo_fleet import DEMO_FLEET, DemoFleet, DemoOptions
from syncfw.cli.demo_summary import Summary, _writes
from syncfw.node import Node


def test_the_demo_runs_insecure_only_when_asked_and_prints_no_grpc_core_lines(
    tmp_path: Path,
) -> None:
    # A process of its own: gRPC's C core would write to file descriptor 2 directly.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "syncfw",
            "demo",
            "--dir",
            str(tmp_path),
            "--quick",
            "--insecure",
            "--no-nats",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "INSECURE (--insecure)" in out
    assert "act 4, model rollout: skipped in --insecure" in out
    assert "[ok  ] all replicas identical: 7 nodes" in out
    assert "[SKIP] the JetStream stream complete: export skipped (--no-nats)" in out
    assert "all checks passed" in out
    assert proc.stderr == ""  # the story on stdout, log lines in the folder, nothing else
    # the nodes' log lines went to the folder's log instead (an insecure fleet warns)
    assert "WARNING syncfw.node: fleet 'demo-mine' runs UNSIGNED" in (tmp_path / "demo.log").read_text()
    assert not (tmp_path / "keys").exists()


def test_a_folder_in_use_is_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cloud.db").write_bytes(b"")
    assert main(["demo", "--dir", str(tmp_path), "--quick"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cloud.db"]


def test_a_failed_check_fails_the_demo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = Summary()
    failed.add("all replicas identical", True, "7 nodes")
    failed.add("no write lost", False, "result results/t7/x missing on the cloud")

    async def story(folder: Path, options: DemoOptions | None = None) -> tuple[int, Summary]:
        return 0, failed

    monkeypatch.setattr(demo_cmd, "demo", story)
    assert main(["demo", "--dir", str(tmp_path), "--insecure"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] no write lost: result results/t7/x missing" in out
    assert "SUMMARY FAILED" in out


async def test_the_write_check_catches_a_lost_write(tmp_path: Path) -> None:
    """The ledger says more than the replicas hold: the check fails and names it."""
    fleet = DemoFleet(tmp_path, DemoOptions(secure=False))
    try:
        for n in fleet.names:
            fleet.nodes[n] = await Node.open(tmp_path / f"{n}.db", node_id=n, fleet=DEMO_FLEET)
        await fleet.nodes["t7"].counter("site/ore-tonnes").add(40)
        ops = await fleet.nodes["t7"].ops_since({})
        for n in fleet.names:
            if n != "t7":
                await fleet.nodes[n].apply_remote(ops)
        ledger = Ledger(tonnes=40)
        ok = Summary()
        await _writes(fleet, ledger, ok)
        assert ok.ok, ok.checks
        ledger.tonnes += 25  # an increment the demo made that no replica holds
        ledger.alerts.add("outage:t9:3")
        lost = Summary()
        await _writes(fleet, ledger, lost)
        assert not lost.ok
        assert "ore tonnes 40 != 65 added" in lost.checks[0].detail
        assert "alerts: 1 missing" in lost.checks[0].detail
    finally:
        for node in fleet.nodes.values():
            await node.close()


def test_the_log_lines_go_to_the_folder(tmp_path: Path) -> None:
    args = argparse.Namespace(log_level=None, verbose=False, log_format=None, dir=str(tmp_path))
    with demo_cmd._logs_to_file(tmp_path, args):
        logging.getLogger("syncfw.demo").warning("a line for the file")
    assert "a line for the file" in (tmp_path / "demo.log").read_text()
