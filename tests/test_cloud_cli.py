"""``syncfw cloud run`` and ``syncfw cloud tail`` as processes: an aggregator, an edge feeding
it over gRPC, a tail that prints the edge's results and the vector to resume from; bad input
is a clear error."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from cryptography import x509

from syncfw import Fleet, Node
from syncfw.cli import main
from syncfw.cli.cloud_cmd import parse_vector
from syncfw.exchange import run_exchange
from syncfw.keyfiles import load_fleet, load_node
from syncfw.mesh import MeshConfig
from syncfw.sync.frames import Status
from syncfw.testing import wait_until
from syncfw.testing.memory import MemoryReplica
from syncfw.transport.rpc import ChannelPool, TlsConfig, TransportConfig

FLEET = Fleet(fleet_id="cli-cloud")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


async def _syncfw(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncfw", *args, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


def test_vectors_parse_in_both_forms_and_bad_ones_are_refused() -> None:
    assert parse_vector('{"t1": 5, "t2": 0}') == {"t1": 5, "t2": 0}
    assert parse_vector("t1=5, t2=3") == {"t1": 5, "t2": 3}
    assert parse_vector("") == {}
    for bad in ("t1=-1", "t1=x", "t1", '{"t1": 1.5}', "[1]"):
        with pytest.raises(ValueError):
            parse_vector(bad)


async def test_cloud_run_and_tail(tmp_path: Path) -> None:
    agg = await _syncfw("cloud", "run", "--db", str(tmp_path / "cloud.db"), "--fleet",
                        FLEET.fleet_id, "--listen", "127.0.0.1:0", "--preset", "test",
                        "--view-file", str(tmp_path / "view.json"), "--view-every", "0.2")
    edge: Node | None = None
    try:
        assert agg.stdout is not None
        line = (await asyncio.wait_for(agg.stdout.readline(), 30)).decode()
        assert line.startswith("listening "), line
        address = line.split()[1]
        edge = await Node.open(tmp_path / "t1.db", node_id="t1", fleet=FLEET)
        await edge.serve("127.0.0.1:0", [address], config=MeshConfig.test())
        await edge.put_many([(f"results/t1/det/r{i}", {"label": i}) for i in range(5)])
        await edge.put("fleet/t1/other", 1)  # not under the prefix: passed over

        def shown() -> bool:
            try:
                view = json.loads((tmp_path / "view.json").read_text())
            except (OSError, ValueError):
                return False
            return view["nodes"].get("t1", {}).get("inferences") == 5

        await wait_until(shown, what="the view file shows t1's results", timeout_s=20)
        tail = await _syncfw("cloud", "tail", address, "--prefix", "results/", "--limit", "3")
        out, err = await asyncio.wait_for(tail.communicate(), 30)
        assert tail.returncode == 0, err.decode()
        rows = [json.loads(x) for x in out.decode().splitlines()]
        assert [(r["origin"], r["key"]) for r in rows] == [
            ("t1", f"results/t1/det/r{i}") for i in range(3)
        ]
        assert rows[0]["value"] == {"label": 0}
        position = json.loads(err.decode().strip().splitlines()[-1].split(" ", 1)[1])
        # resume from the printed position: the rest, nothing twice
        tail = await _syncfw("cloud", "tail", address, "--prefix", "results/", "--from",
                             json.dumps(position), "--limit", "2")
        out, err = await asyncio.wait_for(tail.communicate(), 30)
        assert [json.loads(x)["key"] for x in out.decode().splitlines()] == [
            "results/t1/det/r3", "results/t1/det/r4"
        ]
        # a position the aggregator cannot serve: a clear error, exit 2
        tail = await _syncfw("cloud", "tail", address, "--from", "ghost=4")
        out, err = await asyncio.wait_for(tail.communicate(), 30)
        assert tail.returncode == 2 and b"ahead" in err and b"ghost" in err, err
        tail = await _syncfw("cloud", "tail", address, "--from", "t1=x")
        out, err = await asyncio.wait_for(tail.communicate(), 30)
        assert tail.returncode == 2 and b"not a non-negative integer" in err, err
    finally:
        if edge is not None:
            await edge.close()
        agg.send_signal(signal.SIGTERM)
        await asyncio.wait_for(agg.wait(), 30)
    assert agg.returncode == 0


async def test_a_subscriber_certificate_from_keys_add_subscriber_tails_but_never_syncs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["keys", "init-fleet", str(keys), "--fleet", "cli-subs", "--authority", "cloud"]) == 0
    for node in ("cloud", "t1"):
        assert main(["keys", "add-node", str(keys), node]) == 0
    assert main(["keys", "add-subscriber", str(keys), "dash"]) == 0
    assert "subscriber sub:dash" in capsys.readouterr().out
    cert = x509.load_pem_x509_certificate((keys / "subscribers/dash/node.crt").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=sub:dash"
    # a node id naming a subscriber, or the same subscriber twice: clear errors, nothing written
    assert main(["keys", "add-node", str(keys), "sub:dash"]) == 2
    assert "name change-feed subscribers" in capsys.readouterr().err
    assert not (keys / "nodes" / "sub:dash").exists()
    assert main(["keys", "add-subscriber", str(keys), "dash"]) == 2
    assert "already has keys" in capsys.readouterr().err

    agg = await _syncfw("cloud", "run", "--db", str(tmp_path / "cloud.db"), "--keys", str(keys),
                        "--listen", "127.0.0.1:0", "--preset", "test",
                        "--view-file", str(tmp_path / "view.json"), "--view-every", "0.2")
    edge: Node | None = None
    pool: ChannelPool | None = None
    try:
        assert agg.stdout is not None
        line = (await asyncio.wait_for(agg.stdout.readline(), 60)).decode()
        assert line.startswith("listening "), line
        address = line.split()[1]
        fleet = load_fleet(keys).bind(Fleet(fleet_id="cli-subs", authority="cloud"))
        t1 = load_node(keys, "t1")
        edge = await Node.open(tmp_path / "t1.db", node_id="t1", fleet=fleet, keys=t1)
        await edge.serve("127.0.0.1:0", [address], config=MeshConfig.test(),
                         tls=TlsConfig(t1.ca_pem, t1.cert_pem, t1.key_pem))
        await edge.put_many([(f"results/t1/det/r{i}", {"label": i}) for i in range(4)])

        tail = await _syncfw("cloud", "tail", address, "--keys", str(keys), "--as", "dash",
                             "--prefix", "results/", "--limit", "4")
        out, err = await asyncio.wait_for(tail.communicate(), 60)
        assert tail.returncode == 0, err.decode()
        assert [json.loads(x)["key"] for x in out.decode().splitlines()] == [
            f"results/t1/det/r{i}" for i in range(4)
        ]

        # the same certificate offering an op on Sync/Exchange: refused, nothing stored
        tls = TlsConfig.from_files(keys / "ca.crt", keys / "subscribers/dash/node.crt",
                                   keys / "subscribers/dash/node.key")
        intruder = MemoryReplica("sub:dash", fleet)
        intruder.put("fleet/sub:dash/x", "forged")
        pool = ChannelPool(TransportConfig(tls=tls))
        result = await run_exchange(intruder, await pool.open(address), timeout_s=30.0)
        if result.status is Status.INTERNAL and "from Core" in result.reason:
            # grpc can report the server's refusal racing the client's first write as
            # its own internal error; the refusal itself is what is asserted, so ask again
            result = await run_exchange(intruder, await pool.open(address), timeout_s=30.0)
        assert not result.ok
        assert result.status is Status.FAILED_PRECONDITION, result
        assert "subscriber" in result.reason
        await edge.put("results/t1/det/last", {"label": "last"})  # a marker after the attempt

        def marker_seen() -> bool:
            try:
                view = json.loads((tmp_path / "view.json").read_text())
            except (OSError, ValueError):
                return False
            return view["nodes"].get("t1", {}).get("inferences") == 5

        await wait_until(marker_seen, what="the view shows the marker", timeout_s=30)
        view = json.loads((tmp_path / "view.json").read_text())
        assert "sub:dash" not in view["nodes"]
    finally:
        if pool is not None:
            await pool.aclose()
        if edge is not None:
            await edge.close()
        agg.send_signal(signal.SIGTERM)
        await asyncio.wait_for(agg.wait(), 30)
    assert agg.returncode == 0
