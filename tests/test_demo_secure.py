"""``syncfw demo`` runs a signed fleet over mutual TLS by default; ``--insecure`` runs without."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import pytest

from syncfw.cli import main
from syncfw.cli.demo import DEMO_FLEET, TRUCKS
from syncfw.node import Node
from syncfw.trust.keydir import load_fleet, load_node


async def _signed_origins(folder: Path, node: str) -> set[str]:
    """Origins whose ops the node holds with a head signature (what relayers carried)."""
    fleet = load_fleet(folder / "keys").bind(DEMO_FLEET)
    async with Node.open(folder / f"{node}.db", node_id=node, fleet=fleet,
                         keys=load_node(folder / "keys", node)) as n:
        assert n.metrics.value("syncfw_trust_mode", mode="signed") == 1
        return {op.origin for op in await n.ops_since({}) if op.sig is not None}


def test_the_demo_is_signed_and_mutual_tls_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--dir", str(tmp_path), "--writes", "20", "--frames", "4"]) == 0
    out = capsys.readouterr().out
    assert "secure: signed ops, mutual TLS" in out
    assert "converged: identical state on 4 nodes" in out
    assert "the depot differs" in out  # the partition was real under TLS too
    keys = tmp_path / "keys"
    for n in ("depot", *TRUCKS):
        assert stat.S_IMODE((keys / "nodes" / n / "node.key").stat().st_mode) == 0o600
    # the depot holds every origin's ops with their signed heads: relayed, verified, kept
    assert asyncio.run(_signed_origins(tmp_path, "depot")) == {"depot", *TRUCKS}


def test_the_demo_runs_insecure_only_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--dir", str(tmp_path), "--writes", "10", "--frames", "2",
                 "--insecure"]) == 0
    out = capsys.readouterr().out
    assert "INSECURE (--insecure)" in out
    assert "converged: identical state on 4 nodes" in out
    assert not (tmp_path / "keys").exists()
