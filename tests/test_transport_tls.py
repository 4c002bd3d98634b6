"""Mutual TLS: only fleet certificates get in, and a peer is the node its certificate names."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from syncfw.exchange import ExchangeOutcome, run_exchange
from syncfw.sync import Status
from syncfw.testing.memory import MemoryReplica
from syncfw.testing.waiting import wait_until
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.rpc import ChannelPool, GrpcServer, TlsConfig, TransportConfig

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _run(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-subj",
        f"/CN={name}",
        "-days",
        "1",
        cwd=d,
    )


def _cert(d: Path, node: str, ca: str = "ca") -> TlsConfig:
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _run(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{node}.key",
        "-out",
        f"{node}.csr",
        "-subj",
        f"/CN={node}",
        cwd=d,
    )
    _run(
        "x509",
        "-req",
        "-in",
        f"{node}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{node}.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        cwd=d,
    )
    return TlsConfig.from_files(d / "ca.pem", d / f"{node}.pem", d / f"{node}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsConfig]:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "rogue-ca")
    out = {n: _cert(d, n) for n in ("a", "b")}
    out["outsider"] = _cert(d, "outsider", ca="rogue-ca")
    return out


async def _serve(replica: MemoryReplica, tls: TlsConfig, seen: list[ExchangeOutcome]) -> GrpcServer:
    async def handler(stream: FrameStream) -> None:
        seen.append(await run_exchange(replica, stream))

    return await GrpcServer.start("127.0.0.1:0", handler, config=TransportConfig(tls=tls))


async def test_mtls_exchange_binds_the_peer_to_its_certificate(pki: dict[str, TlsConfig]) -> None:
    b = MemoryReplica("b")
    seen: list[ExchangeOutcome] = []
    server = await _serve(b, pki["b"], seen)
    pool = ChannelPool(TransportConfig(tls=pki["a"], connect_timeout_s=3))
    try:
        a = MemoryReplica("a")
        a.put("fleet/a/k", 1)
        out = await run_exchange(a, await pool.open(server.address))
        assert out.ok, out
        # the client can end before the server's handler has returned its outcome
        await wait_until(lambda: len(seen) == 1, what="the server's outcome")
        assert seen[-1].peer_id == "a"
        assert b.get("fleet/a/k") == 1
        # a certified node that says hello as another node is refused
        mallory = MemoryReplica("mallory")
        out = await run_exchange(mallory, await pool.open(server.address))
        assert out.status is Status.FAILED_PRECONDITION
        assert "expected peer 'a'" in out.reason
    finally:
        await pool.aclose()
        await server.aclose(grace_s=0)


async def test_no_certificate_or_a_foreign_ca_does_not_get_in(pki: dict[str, TlsConfig]) -> None:
    server = await _serve(MemoryReplica("b"), pki["b"], [])
    try:
        for cfg in (TransportConfig(), TransportConfig(tls=pki["outsider"])):
            pool = ChannelPool(cfg.__class__(tls=cfg.tls, connect_timeout_s=0.5))
            try:
                with pytest.raises(LinkError) as info:  # the TLS handshake never completes
                    await pool.open(server.address)
                assert info.value.status is Status.UNAVAILABLE
            finally:
                await pool.aclose()
    finally:
        await server.aclose(grace_s=0)
