"""``syncfw keys`` and ``syncfw node serve --keys``: real files, a real node process."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
from pathlib import Path

import pytest

from syncfw.cli import main
from syncfw.keyfiles import load_fleet, load_node
from syncfw.mesh import MeshConfig
from syncfw.node import Node
from syncfw.testing import wait_until
from syncfw.trust import Revocation, open_statement
from syncfw.zones import Fleet

ROOT = Path(__file__).resolve().parent.parent


def test_init_add_export_show_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "fleet"
    assert main(["keys", "init-fleet", str(d), "--fleet", "mine", "--authority", "hq"]) == 0
    assert "authority key" in capsys.readouterr().out
    for n in ("hq", "t7"):
        assert main(["keys", "add-node", str(d), n]) == 0
    assert main(["keys", "export", str(d), "t7", str(tmp_path / "t7")]) == 0
    assert stat.S_IMODE((tmp_path / "t7/nodes/t7/sign.key").stat().st_mode) == 0o600
    assert not (tmp_path / "t7/ca.key").exists()
    capsys.readouterr()
    assert main(["keys", "show", str(d)]) == 0
    out = capsys.readouterr().out
    assert "fleet      mine" in out and "node       hq: " in out and "signs with the authority key" in out
    assert "node       t7: certificate until" in out and "from seq 1" in out
    assert "BEGIN" not in out  # no key material
    assert main(["keys", "revoke", str(d), "t7", "--after-seq", "9"]) == 0
    statement = (d / "revocations/t7.after-9").read_bytes()
    st = open_statement(statement, load_fleet(d).authority_key, "mine")
    assert isinstance(st, Revocation) and st.after_seq == 9


def test_refusals_are_clear_and_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "fleet"
    assert main(["keys", "init-fleet", str(d)]) == 0
    assert main(["keys", "add-node", str(d), "t7"]) == 0
    before = (d / "nodes/t7/sign.key").read_bytes()
    capsys.readouterr()
    assert main(["keys", "init-fleet", str(d)]) == 2
    assert main(["keys", "add-node", str(d), "t7"]) == 2
    assert main(["keys", "revoke", str(tmp_path / "nowhere"), "t7", "--after-seq", "1"]) == 2
    err = capsys.readouterr().err
    assert "syncfw keys init-fleet: " in err and "already holds a fleet" in err
    assert "syncfw keys add-node: node 't7' already has keys" in err
    assert "fleet file" in err and "is missing" in err
    assert (d / "nodes/t7/sign.key").read_bytes() == before
    os.chmod(d / "nodes/t7/sign.key", 0o640)
    assert main(["keys", "show", str(d)]) == 0
    assert "BROKEN" in capsys.readouterr().out  # show reports, it does not hide


def test_node_serve_keys_refuses_keys_that_are_not_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "fleet"
    main(["keys", "init-fleet", str(d), "--fleet", "mine"])
    main(["keys", "add-node", str(d), "t7"])
    capsys.readouterr()
    base = ["node", "serve", str(tmp_path / "x.db"), "--fleet", "mine", "--listen", "127.0.0.1:0"]
    assert main([*base, "--id", "t9", "--keys", str(d)]) == 2
    assert "no keys for node 't9'" in capsys.readouterr().out
    assert main([*base, "--id", "t7", "--keys", str(d), "--fleet", "other"]) == 2
    assert "not 'other'" in capsys.readouterr().out


async def test_node_serve_keys_runs_a_signed_mtls_node(tmp_path: Path) -> None:
    d = tmp_path / "fleet"
    assert main(["keys", "init-fleet", str(d), "--fleet", "mine", "--authority", "cloud"]) == 0
    for n in ("cloud", "t7"):
        assert main(["keys", "add-node", str(d), n]) == 0
    assert main(["keys", "export", str(d), "cloud", str(tmp_path / "cloud")]) == 0
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncfw", "node", "serve", str(tmp_path / "cloud.db"),
        "--id", "cloud", "--fleet", "mine", "--authority", "cloud", "--listen",
        "127.0.0.1:0", "--preset", "test", "--admin", "none", "--keys", str(tmp_path / "cloud"),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            first = (await proc.stdout.readline()).decode()
        assert first.startswith("listening "), first
        address = first.split()[1]
        fleet = load_fleet(d).bind(Fleet(fleet_id="mine", authority="cloud"))
        async with Node.open(tmp_path / "t7.db", node_id="t7", fleet=fleet,
                             keys=load_node(d, "t7")) as t7:
            await t7.serve("127.0.0.1:0", [address], config=MeshConfig.test(),
                           tls=_tls(d, "t7"))
            await t7.put("fleet/t7/odometer", 7)

            async def acked() -> bool:  # the cloud authenticated t7 and applied its signed ops
                return (await t7.peer_ack("cloud")).get("t7", 0) >= 2

            await wait_until(acked, what="the cloud's authenticated ack of t7's ops")
            assert t7.metrics.value("syncfw_acks_ignored_total") == 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"UNSIGNED" not in err


def _tls(d: Path, node: str) -> object:
    from syncfw.cli.keys_cmd import tls_of

    return tls_of(load_node(d, node))
