"""``syncfw node serve``: the CLI verb runs a node in the mesh and stops on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from syncfw.cli import node_cmd

ROOT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncfw")
    node_cmd.register(parser.add_subparsers(dest="command"))
    return parser


def test_verb_has_help_for_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["node", "serve", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--id",
        "--fleet",
        "--listen",
        "--seed",
        "--preset",
        "--status-file",
        "--shared",
    ):
        assert option in out
    args = _parser().parse_args(
        ["node", "serve", "x.db", "--id", "t7", "--shared", "site/", "--seed", "127.0.0.1:1"]
    )
    fleet = node_cmd.fleet_of(args)
    assert fleet.grants[0].prefix == "site/"
    assert args.seed == ["127.0.0.1:1"]


async def test_two_cli_nodes_sync_and_stop_cleanly(tmp_path: Path) -> None:
    pytest.importorskip("syncfw.node")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = []
    try:
        addresses: list[str] = []
        for name in ("c1", "c2"):
            args = [
                sys.executable,
                "-c",
                "import argparse, sys; from syncfw.cli import node_cmd;"
                "p = argparse.ArgumentParser(); node_cmd.register(p.add_subparsers());"
                "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))",
                "node",
                "serve",
                str(tmp_path / f"{name}.db"),
                "--id",
                name,
                "--fleet",
                "cli",
                "--preset",
                "test",
                "--status-file",
                str(tmp_path / f"{name}.json"),
                "--status-every",
                "0.05",
            ]
            for a in addresses:
                args += ["--seed", a]
            proc = await asyncio.create_subprocess_exec(
                *args, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE
            )
            procs.append(proc)
            assert proc.stdout is not None
            async with asyncio.timeout(20):
                line = (await proc.stdout.readline()).decode()
            assert line.startswith("listening ")
            addresses.append(line.split()[1])

        def status(name: str) -> dict[str, object] | None:
            try:
                return json.loads((tmp_path / f"{name}.json").read_text())  # type: ignore[no-any-return]
            except (OSError, ValueError):
                return None

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:  # the two nodes find each other through the seed and exchange
            s1, s2 = status("c1"), status("c2")
            members: dict[str, dict[str, str]] = s1["mesh"]["members"] if s1 and s2 else {}  # type: ignore[index]
            if any(m["state"] == "alive" and m["node_id"] == "c2" for m in members.values()):
                break
            assert loop.time() < deadline, (s1, s2)
            await asyncio.sleep(0.05)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            async with asyncio.timeout(15):
                assert await proc.wait() == 0
