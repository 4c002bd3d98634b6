"""Hostile peers against a real node's gRPC server on loopback: one identity, many hosts.

An attacker's calls come from other loopback addresses (127.0.0.2, .3, ...:
other hosts to the server) through ``bench/hostile.py``'s TCP ``forwarder``,
so grpc's own client (and, under mTLS, its own handshake) reaches the node
from a chosen source. Each test shows the attack is refused with a clear
status and leaves nothing behind, while an honest peer keeps being served:

- one mTLS identity holding its exchange quota from several hosts is refused
  ``identity_quota`` from any further host (counted, one WARNING), while
  another identity, from the very host refused, syncs;
- a Hello whose node id is 4 MiB leaves no entry in the node's peers table
  and no long log line;
- a batch with an op whose zone or kind is over its codec limit is refused
  ``INVALID_ARGUMENT`` naming the field, applies nothing (not even the valid op
  before it) and so is never relayed to a third node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from conftest import load_bench, raw_exchange

from syncfw.codec import encode_batch
from syncfw.exchange import ExchangeOutcome, run_exchange
from syncfw.keyfiles import NodeKeys, add_node, init_fleet, load_fleet, load_node
from syncfw.log import MAX_KIND_BYTES, MAX_ZONE_BYTES
from syncfw.node import Node
from syncfw.sync import PROTOCOL_VERSION, Digest, Hello, Ops, Status, Summary
from syncfw.testing.ops import OpWriter
from syncfw.testing.waiting import wait_until
from syncfw.transport.base import FrameStream, LinkError
from syncfw.transport.rpc import ChannelPool, GrpcServer, GrpcStream, TlsConfig, TransportConfig
from syncfw.transport.wire import encode_frame
from syncfw.zones import Fleet

hostile = load_bench("hostile")

PER_IDENTITY = 2


def _tls(keys: NodeKeys) -> TlsConfig:
    return TlsConfig(keys.ca_pem, keys.cert_pem, keys.key_pem)


@dataclasses.dataclass
class Pki:
    """A signed fleet's key directory: CA, authority, and keys for each node named."""

    root: Path
    fleet: Fleet

    def keys(self, node: str) -> NodeKeys:
        return load_node(self.root, node)

    def tls(self, node: str) -> TlsConfig:
        return _tls(self.keys(node))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki") / "fleet"
    init_fleet(root, "hostile-identity", authority="a")
    for n in ("a", "b", "evil"):
        add_node(root, n)
    fleet = load_fleet(root).bind(Fleet(fleet_id="hostile-identity", authority="a"))
    return Pki(root, fleet)


def _handler(node: Node, cfg: TransportConfig) -> Callable[[FrameStream], Awaitable[None]]:
    async def handler(stream: FrameStream) -> None:
        await run_exchange(node, stream, timeout_s=cfg.exchange_timeout_s, metrics=node.metrics)

    return handler


@contextlib.asynccontextmanager
async def _from(source: str, port: int) -> AsyncIterator[str]:
    """A loopback address whose connections reach ``port`` from ``source`` (another host)."""
    relay, relay_port = await hostile.forwarder(port, source)
    try:
        yield f"127.0.0.1:{relay_port}"
    finally:
        relay.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(relay.wait_closed(), 2.0)


# -- one identity's quota, over mTLS, from several hosts ------------------------------


async def _hello_call(pool: ChannelPool, address: str, fleet: Fleet) -> GrpcStream:
    """An exchange call from ``evil`` that says Hello and then nothing: it holds its slot."""
    stream = await pool.open(address, expect_id="a", timeout_s=30.0)
    hello = Hello(PROTOCOL_VERSION, fleet.fleet_id, "evil", fleet_digest=fleet.bootstrap_digest())
    await stream.send(encode_frame(hello))
    return stream


async def _read_to_end(stream: GrpcStream) -> None:
    while await stream.recv() is not None:
        pass


async def _refused_with(pool: ChannelPool, address: str, fleet: Fleet) -> LinkError:
    """How the server ends a call from ``evil`` that says Hello (it must refuse it)."""
    stream = await _hello_call(pool, address, fleet)
    try:
        with pytest.raises(LinkError) as info:  # well before the held calls' own deadline
            await asyncio.wait_for(_read_to_end(stream), 5.0)
        return info.value
    finally:
        await stream.close(Status.CANCELLED, "done")


async def _honest_syncs(
    b: Node, cfg: TransportConfig, address: str, key: str, n: int
) -> list[ExchangeOutcome]:
    """``n`` exchanges of ``b`` with the server at ``address``, each after a write to ``key``."""
    pool = ChannelPool(cfg, metrics=b.metrics)
    outs = []
    try:
        for i in range(n):
            await b.put(f"fleet/b/{key}", i)
            stream = await pool.open(address, expect_id="a")
            outs.append(
                await run_exchange(b, stream, metrics=b.metrics, initiator=True, timeout_s=5.0)
            )
    finally:
        await pool.aclose()
    return outs


async def test_one_identity_holding_its_quota_from_several_hosts_is_refused_and_another_served(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="syncfw.transport")
    cfg = TransportConfig.test(
        tls=pki.tls("a"),
        connect_timeout_s=5.0,
        hello_timeout_s=3.0,
        max_exchanges_per_identity=PER_IDENTITY,
        max_exchanges_per_peer=4,
        max_concurrent_exchanges=12,
        exchange_timeout_s=8.0,  # the held calls outlive the test's checks
        refusal_log_interval_s=60.0,  # one line for the whole test
    )
    a = await Node.open(tmp_path / "a.db", node_id="a", fleet=pki.fleet, keys=pki.keys("a"))
    b = await Node.open(tmp_path / "b.db", node_id="b", fleet=pki.fleet, keys=pki.keys("b"))
    server = await GrpcServer.start("127.0.0.1:0", _handler(a, cfg), config=cfg, metrics=a.metrics)
    evil = ChannelPool(dataclasses.replace(cfg, tls=pki.tls("evil")))
    honest_cfg = dataclasses.replace(cfg, tls=pki.tls("b"))
    held: list[GrpcStream] = []
    try:
        async with (
            _from("127.0.0.2", server.port) as via2,
            _from("127.0.0.3", server.port) as via3,
            _from("127.0.0.4", server.port) as via4,
        ):
            # evil's quota, one call from each of two hosts: neither is near its host quota
            for via in (via2, via3):
                held.append(await _hello_call(evil, via, pki.fleet))
            await wait_until(lambda: server.admission.active == PER_IDENTITY, timeout_s=5)
            # from a third host, where evil has nothing open: refused for its identity,
            # while b syncs from that same host and from another one meanwhile
            refused, from4, direct = await asyncio.gather(
                asyncio.gather(*(_refused_with(evil, via4, pki.fleet) for _ in range(3))),
                _honest_syncs(b, honest_cfg, via4, "from4", 3),
                _honest_syncs(b, honest_cfg, server.address, "direct", 3),
            )
            for err in refused:
                assert err.status is Status.RESOURCE_EXHAUSTED, err
                assert err.reason == "too many exchanges at once from this node id (identity_quota)"
            assert all(o.ok for o in [*from4, *direct]), [*from4, *direct]
            assert await a.get("fleet/b/from4") == await a.get("fleet/b/direct") == 2
            assert (await a.version_vector())["b"] == (await b.version_vector())["b"]
            # evil still holds its quota (the server may still be ending b's last calls)
            await wait_until(lambda: server.admission.active == PER_IDENTITY, timeout_s=5)
            assert a.metrics.value("syncfw_refused_streams_total", reason="identity_quota") == 3
            status = await a.status()
            assert status["metrics"]["refused_streams"] == {"identity_quota": 3}
            lines = [
                r for r in caplog.records
                if r.levelno == logging.WARNING and "identity_quota" in r.getMessage()
            ]
            assert len(lines) == 1, [r.getMessage() for r in lines]
            assert "127.0.0.4" in lines[0].getMessage()
            # a slot evil gives back is its own again, from any host
            await held.pop().close(Status.CANCELLED, "done")
            await wait_until(lambda: server.admission.active == PER_IDENTITY - 1, timeout_s=5)
            held.append(await _hello_call(evil, via4, pki.fleet))
            await wait_until(lambda: server.admission.active == PER_IDENTITY, timeout_s=5)
            assert a.metrics.value("syncfw_refused_streams_total", reason="identity_quota") == 3
            for s in held:
                await s.close(Status.CANCELLED, "done")
            await evil.aclose()
    finally:
        for s in held:
            await s.close(Status.CANCELLED, "done")
        await evil.aclose()
        await server.aclose(grace_s=0)
        await b.close()
        await a.close()


# -- a Hello with a 4 MiB node id, and ops over their field limits ----------------------

FLEET = Fleet(fleet_id="f")


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Node, GrpcServer]]:
    node = await Node.open(tmp_path / "a.db", node_id="a", fleet=FLEET)
    await node.put("fleet/a/x", 1)
    cfg = TransportConfig.test()
    server = await GrpcServer.start(
        "127.0.0.1:0", _handler(node, cfg), config=cfg, metrics=node.metrics
    )
    yield node, server
    await server.aclose(grace_s=0)
    await node.close()


def _opening(node_id: str = "evil", vv: dict[str, int] | None = None) -> list[bytes]:
    hello = Hello(PROTOCOL_VERSION, FLEET.fleet_id, node_id, fleet_digest=FLEET.bootstrap_digest())
    return [encode_frame(hello), encode_frame(Digest(b"\x01" * 16)), encode_frame(Summary(vv or {}))]


async def _sync(node: Node, address: str) -> ExchangeOutcome:
    pool = ChannelPool(TransportConfig.test())
    try:
        return await run_exchange(node, await pool.open(address), initiator=True, timeout_s=5.0)
    finally:
        await pool.aclose()


def _peers_rows(db: Path) -> list[str]:
    """The peers table as SQLite holds it (read through a connection of its own)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT peer FROM peers")]


async def test_a_hello_with_a_4_mib_node_id_leaves_no_peer_entry_and_no_long_log_line(
    served: tuple[Node, GrpcServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node, server = served
    huge = "n" * (4 << 20)
    caplog.set_level(logging.DEBUG)
    async with _from("127.0.0.2", server.port) as via:
        # the whole opening: were the Hello taken, its Summary would be acknowledged
        code, details = await raw_exchange(via, _opening(huge, {"a": 1}))
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert "Hello.node_id of 4194304 chars exceeds 256" in details and len(details) < 400
    assert await node.store.peer_acks() == {}
    assert _peers_rows(tmp_path / "a.db") == []
    # an honest peer is served, and its ack is what the table holds
    good = await Node.open(tmp_path / "good.db", node_id="good", fleet=FLEET)
    try:
        await good.put("fleet/good/y", 2)
        out = await _sync(good, server.address)
        assert out.ok, out
    finally:
        await good.close()
    assert await node.get("fleet/good/y") == 2

    async def acked() -> bool:
        return bool(await node.peer_ack("good"))

    await wait_until(acked, timeout_s=5, what="the honest peer's ack")
    assert list(await node.store.peer_acks()) == ["good"]
    assert _peers_rows(tmp_path / "a.db") == ["good"]
    longest = max(caplog.records, key=lambda r: len(r.getMessage()))
    assert len(longest.getMessage()) < 2000, longest.getMessage()[:300]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("zone", "z" * (MAX_ZONE_BYTES + 1), f"op zone of {MAX_ZONE_BYTES + 1} chars exceeds"),
        ("kind", "k" * (MAX_KIND_BYTES + 1), f"op kind of {MAX_KIND_BYTES + 1} chars exceeds"),
    ],
)
async def test_an_op_over_its_zone_or_kind_limit_is_refused_applied_nowhere_and_never_relayed(
    served: tuple[Node, GrpcServer], tmp_path: Path, field: str, value: str, words: str
) -> None:
    node, server = served
    before = await node.version_vector()
    w = OpWriter("evil")
    good_op = w.write("x", 1)  # valid, and first in the batch
    op = w.write("y", 2)
    bad_op = dataclasses.replace(op, zone=value) if field == "zone" else dataclasses.replace(op, kind=value)
    frames = [*_opening(), encode_frame(Ops(encode_batch([good_op, bad_op])))]
    async with _from("127.0.0.2", server.port) as via:
        code, details = await raw_exchange(via, frames)
    assert code is grpc.StatusCode.INVALID_ARGUMENT, details
    assert words in details and len(details) < 400
    assert await node.version_vector() == before
    # an honest peer keeps being served, both ways
    b = await Node.open(tmp_path / "b.db", node_id="b", fleet=FLEET)
    c = await Node.open(tmp_path / "c.db", node_id="c", fleet=FLEET)
    try:
        await b.put("fleet/b/y", 2)
        out = await _sync(b, server.address)
        assert out.ok, out
        assert await b.get("fleet/a/x") == 1
        assert await node.version_vector() == {**before, "b": 1}
        # a third node syncing from it gets everything it holds, and nothing of evil's
        out = await _sync(c, server.address)
        assert out.ok, out
        assert await c.version_vector() == {**before, "b": 1}
        assert await c.get("fleet/b/y") == 2
        assert await c.get("fleet/evil/x") is None
    finally:
        await c.close()
        await b.close()
