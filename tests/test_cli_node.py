"""The operator's CLI against real node processes: status, put/get/scan through the admin
endpoint and on the file, the lock refusal, systemd readiness, JSON logs, the status file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from syncfw.cli import build_parser
from syncfw.testing import wait_until

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    address: str
    admin: str


async def _serve(argv: list[str], env: dict[str, str]) -> Served:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncfw",
        "node",
        "serve",
        *argv,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        first = (await proc.stdout.readline()).decode()
        assert first.startswith("listening "), first
        second = (await proc.stdout.readline()).decode()
    assert second.startswith("admin http://"), second
    return Served(proc, first.split()[1], second.split("http://")[1].strip())


async def _stop(s: Served) -> tuple[int, str]:
    if s.proc.returncode is None:
        s.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        _, err = await s.proc.communicate()
    return s.proc.returncode or 0, err.decode()


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """One verb in this process (no logging set up), its exit status, stdout and stderr."""
    args: argparse.Namespace = build_parser().parse_args(argv)
    code = int(args.func(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@contextlib.asynccontextmanager
async def _notify_socket(path: Path) -> AsyncIterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def _received(sock: socket.socket, into: list[str]) -> list[str]:
    with contextlib.suppress(BlockingIOError):
        while True:
            into.append(sock.recv(4096).decode())
    return into


async def test_operator_verbs_against_running_nodes_and_their_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db1, db2 = tmp_path / "c1.db", tmp_path / "c2.db"
    conf = tmp_path / "c1.toml"
    conf.write_text(
        f'db = "{db1}"\nid = "c1"\npreset = "test"\nshared = ["site/"]\n'
        f'status_file = "{tmp_path / "c1.json"}"\nstatus_every = 0.05\n'
    )
    base = dict(os.environ, PYTHONPATH=str(ROOT), SYNCFW_FLEET="cli")
    async with _notify_socket(tmp_path / "notify") as notify:
        c1 = await _serve(
            ["--config", str(conf), "--log-format", "json", "-v"],
            dict(base, NOTIFY_SOCKET=str(tmp_path / "notify")),
        )
        told: list[str] = []
        await wait_until(
            lambda: any("READY=1" in m for m in _received(notify, told)), what="READY=1"
        )
        c2 = None
        try:
            c2 = await _serve(
                [
                    str(db2),
                    "--id",
                    "c2",
                    "--preset",
                    "test",
                    "--shared",
                    "site/",
                    "--seed",
                    c1.address,
                ],
                base,
            )
            assert (Path(str(db1) + ".admin")).read_text().strip() == c1.admin

            # writes through the admin endpoint, read back on the other node
            code, out, _ = await asyncio.to_thread(
                _run, ["put", c1.admin, "site/mode", '"night"'], capsys
            )
            assert code == 0 and json.loads(out)["origin"] == "c1"
            code, out, _ = await asyncio.to_thread(
                _run, ["put", c1.admin, "fleet/c1/blob", '{"$bytes": "AAE="}'], capsys
            )
            assert code == 0

            async def c2_has_it() -> bool:
                # both writes: an exchange between the two puts may carry the first alone
                code, out, _ = await asyncio.to_thread(_run, ["get", c2.admin, "site/mode"], capsys)
                if code != 0 or json.loads(out) != "night":
                    return False
                code, _, _ = await asyncio.to_thread(_run, ["get", c2.admin, "fleet/c1/blob"], capsys)
                return code == 0

            await wait_until(c2_has_it, timeout_s=20, what="c2 to receive c1's write")
            code, out, _ = await asyncio.to_thread(_run, ["scan", c2.admin, "fleet/c1/"], capsys)
            assert code == 0
            assert [json.loads(line) for line in out.splitlines()] == [
                {"key": "fleet/c1/blob", "value": {"$bytes": "AAE="}}  # bytes, both ways
            ]
            code, _, err = await asyncio.to_thread(_run, ["get", c1.admin, "site/none"], capsys)
            assert code == 1 and "no key 'site/none'" in err
            code, _, err = await asyncio.to_thread(
                _run, ["put", c1.admin, "fleet/c2/x", "1"], capsys
            )
            assert code == 2 and "ZoneOwnershipError" in err  # the node's zone rules

            # status from the running node: the peer, its state, contact, lag and clock
            async def c1_sees_c2() -> bool:
                code, out, _ = await asyncio.to_thread(_run, ["status", str(db1), "--json"], capsys)
                peers = json.loads(out)["peers"] if code == 0 else []
                return any(
                    p["node_id"] == "c2" and p["state"] == "alive" and p["lag_ops"] == 0
                    for p in peers
                )

            await wait_until(
                c1_sees_c2, timeout_s=20, what="c1's status to show c2 alive and caught up"
            )
            code, out, _ = await asyncio.to_thread(_run, ["status", c1.admin, "--json"], capsys)
            snap = json.loads(out)
            assert (
                snap["source"] == "node" and snap["node_id"] == "c1" and snap["fleet_id"] == "cli"
            )
            peer = next(p for p in snap["peers"] if p["node_id"] == "c2")
            assert peer["last_contact_ago_s"] is not None and peer["last_contact_ago_s"] < 10
            assert peer["lag_s"] == 0 and isinstance(peer["clock_offset_ms"], int | float)
            assert snap["pending"] == 0 and snap["rejected"] == 0
            code, out, _ = await asyncio.to_thread(_run, ["status", c1.admin], capsys)
            assert "c2" in out and "alive" in out and "LAG OPS" in out

            # the file is the running node's: refused, naming the holder and the address to use
            code, _, err = await asyncio.to_thread(_run, ["put", str(db1), "site/x", "1"], capsys)
            assert code == 2 and "open in another store" in err and f"syncfw put {c1.admin}" in err

            status = json.loads((tmp_path / "c1.json").read_text())
            assert status["written_at"] > 0 and status["written_at_iso"].endswith("Z")
            assert status["state_digest_at"] > 0 and status["admin"] == c1.admin
        finally:
            code1, err1 = await _stop(c1)
            if c2 is not None:
                assert (await _stop(c2))[0] == 0
        assert code1 == 0
        assert any("STOPPING=1" in m for m in _received(notify, told))
    assert not Path(str(db1) + ".admin").exists()
    # --log-format json -v: every line JSON, syncfw's DEBUG lines, no other library's
    lines = [json.loads(line) for line in err1.splitlines() if line.strip()]
    assert lines and all(x["logger"].startswith("syncfw") for x in lines)
    assert any(x["level"] == "DEBUG" for x in lines)

    # the stopped node's file: opened as its node (its zones from the file), then read-only
    code, out, _ = await asyncio.to_thread(_run, ["put", str(db1), "site/after", "7"], capsys)
    assert code == 0 and json.loads(out)["origin"] == "c1"
    code, _, err = await asyncio.to_thread(_run, ["put", str(db1), "fleet/c2/x", "1"], capsys)
    assert code == 2 and "c1" in err  # still c1's zones
    code, out, _ = await asyncio.to_thread(_run, ["get", str(db1), "site/after"], capsys)
    assert (code, json.loads(out)) == (0, 7)
    code, out, _ = await asyncio.to_thread(_run, ["status", str(db1), "--json"], capsys)
    snap = json.loads(out)
    assert snap["source"] == "file" and snap["node_id"] == "c1"
    lag: dict[str, Any] = next(p for p in snap["peers"] if p["node_id"] == "c2")
    assert lag["lag_ops"] == 1 and 0 <= lag["lag_s"] < 60 and lag["state"] is None
    code, out, _ = await asyncio.to_thread(_run, ["status", str(db1)], capsys)
    assert code == 0 and "from its file (read-only)" in out


def test_verbs_refuse_targets_that_are_neither_file_nor_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for verb in (["status"], ["get"], ["scan"]):
        argv = [*verb, str(tmp_path / "missing.db")] + (["k"] if verb == ["get"] else [])
        code, out, err = _run(argv, capsys)
        assert (
            code == 2 and out == "" and "neither an existing node file nor an admin address" in err
        )
    code, _, err = _run(["status", "127.0.0.1:1"], capsys)  # nothing listens on port 1
    assert code == 2 and "cannot reach the admin endpoint 127.0.0.1:1" in err
    code, _, err = _run(["put", "127.0.0.1:1", "site/k", "night"], capsys)
    assert code == 2 and "is not JSON" in err and "--string" in err
    assert not (tmp_path / "missing.db").exists()  # never created


def test_status_of_a_file_whose_node_died_reads_the_file_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from syncfw import Fleet, Node

    async def make() -> None:
        async with Node.open(tmp_path / "d.db", node_id="d", fleet=Fleet(fleet_id="f")) as node:
            await node.put("fleet/d/k", 1)
            await node.acknowledge("e", {})  # a peer that holds nothing yet

    asyncio.run(make())
    Path(str(tmp_path / "d.db") + ".admin").write_text("127.0.0.1:1\n")  # left by a SIGKILL
    code, out, err = _run(["status", str(tmp_path / "d.db"), "--json"], capsys)
    snap = json.loads(out)
    assert code == 0 and snap["source"] == "file" and "did not answer" in err
    assert snap["peers"] == [
        {
            "node_id": "e",
            "address": None,
            "state": None,
            "failures": None,
            "last_contact": None,
            "last_contact_ago_s": None,
            "lag_ops": 1,
            "lag_s": snap["peers"][0]["lag_s"],
            "clock_offset_ms": None,
        }
    ]
    assert 0 <= snap["peers"][0]["lag_s"] < 60
