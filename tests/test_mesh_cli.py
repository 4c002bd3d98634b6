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
from syncfw.cli.settings import resolve
from syncfw.testing import wait_until

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
    args = resolve(
        _parser().parse_args(
            ["node", "serve", "x.db", "--id", "t7", "--shared", "site/", "--seed", "127.0.0.1:1"]
        ),
        environ={},
    )
    fleet = node_cmd.fleet_of(args)
    assert fleet.grants[0].prefix == "site/"
    assert args.seed == ["127.0.0.1:1"]


async def test_two_cli_nodes_sync_and_stop_cleanly(tmp_path: Path) -> None:
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

        def found_each_other() -> bool:  # through the seed, and exchanged
            s1, s2 = status("c1"), status("c2")
            members: dict[str, dict[str, str]] = s1["mesh"]["members"] if s1 and s2 else {}  # type: ignore[index]
            return any(m["state"] == "alive" and m["node_id"] == "c2" for m in members.values())

        await wait_until(found_each_other, timeout_s=20, what="c1 to see c2 alive", interval_s=0.05)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            async with asyncio.timeout(15):
                assert await proc.wait() == 0


async def test_a_cli_node_serves_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with pytest.raises(SystemExit):
        _parser().parse_args(["node", "serve", "--help"])
    assert "--metrics HOST:PORT" in capsys.readouterr().out

    def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    args = [
        sys.executable,
        "-c",
        "import argparse, sys; from syncfw.cli import node_cmd;"
        "p = argparse.ArgumentParser(); node_cmd.register(p.add_subparsers());"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))",
        *("node", "serve", str(tmp_path / "m1.db"), "--id", "m1", "--preset", "test"),
        *("--seed", "127.0.0.1:1", "--metrics", "127.0.0.1:0"),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        *args, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            assert (await proc.stdout.readline()).decode().startswith("listening ")
            line = (await proc.stdout.readline()).decode()
        assert line.startswith("metrics http://") and line.rstrip().endswith("/metrics")
        url = line.split()[1]

        async def seed_is_down() -> bool:  # nothing listens on port 1: the seed fails
            got = await asyncio.to_thread(scrape, url)
            peers = {
                s: got.get(("syncfw_peers", (("node", "m1"), ("state", s))), -1.0)
                for s in ("alive", "suspect", "dead")
            }
            return peers["alive"] == 0 and peers["suspect"] + peers["dead"] == 1

        await wait_until(seed_is_down, what="the unreachable seed counted as suspect or dead")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    with pytest.raises(urllib.error.URLError):  # the endpoint stopped with the node
        await asyncio.to_thread(scrape, url)
