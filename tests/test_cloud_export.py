"""Export to NATS JetStream against real ``nats-server`` processes on loopback: the subject
mapping, the durable cursor across restarts, NATS unavailable at start and dying mid-run,
several exporters splitting duty, and two exporters both believing they own an origin."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from syncfw import Fleet, Grant, Node
from syncfw.cloud.export import ExportConfig, ExportConfigError, Exporter, owner_of
from syncfw.cloud.export_check import check_stream, read_stream
from syncfw.cloud.export_cursor import TABLE
from syncfw.cloud.export_servers import NatsCluster
from syncfw.cloud.export_subjects import (
    MessageFormatError,
    op_from_message,
    op_message,
    subject_token,
    zone_subject,
)
from syncfw.log import Op
from syncfw.testing import wait_until

FLEET = Fleet(fleet_id="export-test", authority="cloud", grants=(Grant.of("site/", "*"),))


@pytest.fixture
async def nats1(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    async with NatsCluster(tmp_path / "nats", 1) as c:
        yield c


async def _write(node: Node, n: int, start: int = 0) -> None:
    await node.put_many([(f"fleet/{node.node_id}/k{i}", i) for i in range(start, start + n)])


async def _stream_ok(servers: list[str], node: Node, stream: str = "SYNCFW") -> None:
    ops = await read_stream(servers, stream)
    rep = check_stream(ops, node.store.version_vector)
    assert rep.ok, str(rep)


# ---------------------------------------------------------------------- the format


def test_subject_tokens_are_safe_and_injective() -> None:
    assert zone_subject("syncfw", "f", "results/t7/") == "syncfw.f.results.t7"
    assert subject_token("a.b") == "a%2Eb"
    assert subject_token("*") == "%2A" and subject_token(">") == "%3E"
    assert subject_token("") == "%"
    assert subject_token("%") == "%25"
    assert subject_token("é x") == "%C3%A9%20x"
    assert zone_subject("syncfw", "f", "site/line-") == "syncfw.f.site.line-%"
    zones = ["a/b/", "a.b/", "a/b", "a//b/", "a%2Eb/", "", "/", "a/", "a", "a%/", "%/", "//"]
    subjects = [zone_subject("p", "f", z) for z in zones]
    assert len(set(subjects)) == len(subjects)
    for s in subjects:
        for tok in s.split("."):
            assert tok and tok not in ("*", ">") and " " not in tok


def test_op_message_round_trips_and_refuses_foreign_messages() -> None:
    op = Op("t7", 5, 123456789, "sites/é x/", 2, "sites/é x/k\n1", "lww", b"\x01\x02",
            prev=b"\xaa" * 32, sig=b"\x05" * 64)
    subject, body, headers = op_message("syncfw", "f", op, rejected=True)
    assert subject == "syncfw.f.sites.%C3%A9%20x"
    assert headers["Nats-Msg-Id"] == "t7:5"
    assert all(v.isascii() and "\n" not in v for v in headers.values())
    back = op_from_message(headers, body)
    assert back.op == op and back.rejected
    unsigned = op_message("syncfw", "f", Op("t7", 1, 1, "z/", 0, "z/k", "lww", b""))[2]
    assert "Syncfw-Sig" not in unsigned
    with pytest.raises(MessageFormatError, match="Syncfw-Seq"):
        op_from_message({k: v for k, v in headers.items() if k != "Syncfw-Seq"}, body)
    with pytest.raises(MessageFormatError, match="message id"):
        op_from_message({**headers, "Nats-Msg-Id": "t7:6"}, body)
    with pytest.raises(MessageFormatError):
        op_from_message({**headers, "Syncfw-Prev": "zz"}, body)


def test_config_refuses_unsafe_names() -> None:
    with pytest.raises(ExportConfigError, match="stream name"):
        ExportConfig(servers=("nats://127.0.0.1:4222",), stream="a.b")
    with pytest.raises(ExportConfigError, match="subject prefix"):
        ExportConfig(servers=("nats://127.0.0.1:4222",), subject_prefix="a.>")
    with pytest.raises(ExportConfigError, match="at least one"):
        ExportConfig(servers=())


def test_owner_is_stable_and_moves_only_the_dead_ones_origins() -> None:
    origins = [f"t{i}" for i in range(200)]
    three = {o: owner_of(o, ["a", "b", "c"]) for o in origins}
    assert three == {o: owner_of(o, ["c", "a", "b"]) for o in origins}
    assert all(n > 40 for n in (list(three.values()).count(e) for e in "abc"))
    two = {o: owner_of(o, ["a", "c"]) for o in origins}
    assert all(two[o] == three[o] for o in origins if three[o] != "b")


# ---------------------------------------------------------------------- one server


async def test_exports_every_op_once_and_resumes_from_the_cursor(
    tmp_path: Path, nats1: NatsCluster
) -> None:
    node = await Node.open(tmp_path / "cloud.db", node_id="cloud", fleet=FLEET)
    edge = await Node.open(tmp_path / "edge.db", node_id="edge", fleet=FLEET)
    try:
        await _write(edge, 300)
        await edge.put("site/x", 1)
        await node.apply_remote(await edge.ops_since({}))
        await _write(node, 50)
        cfg = ExportConfig.test(nats1.urls)
        async with Exporter(node, cfg) as ex:
            await wait_until(lambda: ex.lag()[0] == 0, what="caught up")
            st = (await node.status())["export"]
            assert st["state"] == "exporting" and st["stored"] == 351 and st["lag_ops"] == 0
        await _stream_ok(nats1.urls, node)
        ops = await read_stream(nats1.urls, "SYNCFW")
        assert {o.op.key for o in ops if o.op.zone == "site/"} == {"site/x"}
        # the cursor is durable: a new exporter (a restart) publishes only what is new
        await _write(node, 20, start=50)
        async with Exporter(node, cfg) as ex2:
            assert ex2.cursor == {"cloud": 50, "edge": 301}
            await wait_until(lambda: ex2.lag()[0] == 0, what="caught up again")
            assert ex2.stats.stored == 20 and ex2.stats.duplicates == 0
        await _stream_ok(nats1.urls, node)
    finally:
        await edge.close()
        await node.close()
    # the cursor table is a sidecar of the node's own file, and the node still opens
    import sqlite3

    with sqlite3.connect(tmp_path / "cloud.db") as conn:
        rows = dict(conn.execute(f"SELECT origin, seq FROM {TABLE}").fetchall())
    assert rows == {"cloud": 70, "edge": 301}
    again = await Node.open(tmp_path / "cloud.db", node_id="cloud", fleet=FLEET)
    await again.close()


async def test_a_lost_cursor_duplicates_nothing_within_the_window(
    tmp_path: Path, nats1: NatsCluster
) -> None:
    node = await Node.open(tmp_path / "cloud.db", node_id="cloud", fleet=FLEET)
    try:
        await _write(node, 100)
        cfg = ExportConfig.test(nats1.urls)
        async with Exporter(node, cfg) as ex:
            await wait_until(lambda: ex.lag()[0] == 0, what="caught up")
        import sqlite3

        with sqlite3.connect(node.store.path) as conn:
            conn.execute(f"DELETE FROM {TABLE}")
        # and the shared progress is gone too: only the duplicate window is left
        import nats

        nc = await nats.connect(nats1.urls)
        await nc.jetstream().delete_key_value("SYNCFW_progress")
        await nc.close()
        async with Exporter(node, cfg) as ex2:
            assert ex2.cursor == {}
            await wait_until(lambda: ex2.lag()[0] == 0, what="caught up again")
            assert ex2.stats.duplicates == 100 and ex2.stats.stored == 0
        await _stream_ok(nats1.urls, node)
    finally:
        await node.close()


async def test_nats_unavailable_at_start_then_dying_mid_run_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = await Node.open(tmp_path / "cloud.db", node_id="cloud", fleet=FLEET)
    cluster = NatsCluster(tmp_path / "nats", 1)
    try:
        await _write(node, 200)
        cfg = ExportConfig.test(cluster.urls)
        with caplog.at_level(logging.WARNING, logger="syncfw.cloud.export"):
            async with Exporter(node, cfg) as ex:
                await wait_until(lambda: ex.stats.failures >= 3, what="failed attempts")
                st = (await node.status())["export"]
                assert st["state"] == "unavailable" and st["lag_ops"] == 200
                assert "no servers" in st["last_error"].lower() or "connect" in st["last_error"].lower()
                assert st["retry_in_s"] is not None
                warned = [r for r in caplog.records if "stalled" in r.getMessage()]
                assert 1 <= len(warned) < ex.stats.failures  # rate-limited
                metrics = node.metrics.exposition().decode()
                assert 'syncfw_export_lag_ops{exporter="nats:SYNCFW",node="cloud"} 200.0' in metrics
                assert 'syncfw_export_connected{exporter="nats:SYNCFW",node="cloud"} 0.0' in metrics
                assert "syncfw_export_failures_total" in metrics
                await wait_until(lambda: ex.lag()[1] > 0.2, what="lag in seconds grows")

                await cluster.restart(0)  # NATS comes up
                await wait_until(lambda: ex.lag()[0] == 0, timeout_s=20, what="caught up")
                assert ex.state == "exporting"
                failures_before = ex.stats.failures

                cluster.kill(0)  # and dies mid-run, with writes going on
                await _write(node, 100, start=200)
                await wait_until(lambda: ex.stats.failures > failures_before, what="outage seen")
                assert ex.lag()[0] > 0
                await _write(node, 100, start=300)
                await cluster.restart(0)
                await wait_until(lambda: ex.lag()[0] == 0, timeout_s=30, what="caught up after")
        await _stream_ok(cluster.urls, node)
    finally:
        await cluster.aclose()
        await node.close()


async def test_a_stream_without_our_subjects_is_a_clear_error(
    tmp_path: Path, nats1: NatsCluster
) -> None:
    import nats

    nc = await nats.connect(nats1.urls)
    await nc.jetstream().add_stream(name="OTHER", subjects=["elsewhere.>"])
    await nc.close()
    node = await Node.open(tmp_path / "cloud.db", node_id="cloud", fleet=FLEET)
    try:
        await _write(node, 5)
        async with Exporter(node, ExportConfig.test(nats1.urls, stream="OTHER")) as ex:
            await wait_until(lambda: ex.stats.failures >= 1, what="refused")
            assert "without the subjects" in (ex.stats.last_error or "")
            assert ex.lag()[0] == 5
    finally:
        await node.close()


# ---------------------------------------------------------------------- several exporters


async def _replica_pair(tmp_path: Path, n_origins: int, n_ops: int) -> tuple[Node, Node]:
    """Two aggregator-like replicas holding the same ops of ``n_origins`` edges."""
    a = await Node.open(tmp_path / "a.db", node_id="agg-a", fleet=FLEET)
    b = await Node.open(tmp_path / "b.db", node_id="agg-b", fleet=FLEET)
    for i in range(n_origins):
        e = await Node.open(tmp_path / f"e{i}.db", node_id=f"edge-{i}", fleet=FLEET)
        await _write(e, n_ops)
        ops = await e.ops_since({})
        await a.apply_remote(ops)
        await b.apply_remote(ops)
        await e.close()
    return a, b


async def test_two_exporters_split_duty_and_hand_over(tmp_path: Path, nats1: NatsCluster) -> None:
    a, b = await _replica_pair(tmp_path, 8, 40)
    alive = {"agg-a", "agg-b"}
    both = ("agg-a", "agg-b")
    try:
        ea = Exporter(a, ExportConfig.test(nats1.urls, exporters=both), alive=lambda: alive)
        eb = Exporter(b, ExportConfig.test(nats1.urls, exporters=both), alive=lambda: alive)
        async with ea, eb:
            await wait_until(lambda: ea.lag()[0] == 0 and eb.lag()[0] == 0, what="both caught up")
            sa, sb = ea.status()["owned_origins"], eb.status()["owned_origins"]
            assert set(sa).isdisjoint(sb) and sa and sb
            assert set(sa) | set(sb) == set(a.store.version_vector)
            assert ea.stats.duplicates == eb.stats.duplicates == 0
            assert ea.stats.stored + eb.stats.stored == 8 * 40
            # agg-a dies; agg-b's liveness says so and it takes agg-a's origins over
            await ea.aclose()
            for i in range(8):
                e = await Node.open(tmp_path / f"e{i}.db", node_id=f"edge-{i}", fleet=FLEET)
                await _write(e, 10, start=40)
                await b.apply_remote(await e.ops_since({f"edge-{i}": 40}))
                await e.close()
            alive.discard("agg-a")
            await wait_until(lambda: len(eb.status()["owned_origins"]) == 8, what="handover")
            await wait_until(lambda: eb.lag()[0] == 0, what="b caught up")
            assert eb.stats.duplicates == 0
        await _stream_ok(nats1.urls, b)
    finally:
        await a.close()
        await b.close()


async def test_two_exporters_both_owning_an_origin_export_it_once(
    tmp_path: Path, nats1: NatsCluster
) -> None:
    """A split mesh: each exporter believes the other dead, so both own every origin.
    Concurrently: the duplicate window drops the second copy. Later, past the window:
    the shared progress stops the second exporter from publishing what is there."""
    a, b = await _replica_pair(tmp_path, 4, 150)
    both = ("agg-a", "agg-b")
    window = 1.0
    try:
        ca = ExportConfig.test(nats1.urls, exporters=both, duplicate_window_s=window,
                               batch_ops=50)
        ea = Exporter(a, ca, alive=lambda: {"agg-a"})
        eb = Exporter(b, ca, alive=lambda: {"agg-b"})
        async with ea, eb:  # at the same time
            await wait_until(lambda: ea.lag()[0] == 0 and eb.lag()[0] == 0, what="caught up")
            assert ea.status()["owned_origins"] == eb.status()["owned_origins"]
            assert ea.stats.stored + eb.stats.stored == 600
        await _stream_ok(nats1.urls, a)
        # past the duplicate window, a third replica with no cursor believes it owns them too
        c = await Node.open(tmp_path / "c.db", node_id="agg-c", fleet=FLEET)
        await c.apply_remote(await a.ops_since({}))
        await asyncio.sleep(window * 1.5)  # the window must have passed: this waits on time
        try:
            ec = Exporter(c, ExportConfig.test(nats1.urls, exporters=("agg-c",)))
            async with ec:
                await wait_until(lambda: ec.lag()[0] == 0, what="c caught up")
                await wait_until(lambda: ec.cursor == dict(c.store.version_vector),
                                 what="c's cursor committed")
                assert ec.stats.stored == 0 and ec.stats.skipped == 600
                # and what is new is exported by it, once
                await _write(c, 30)
                await wait_until(lambda: ec.lag()[0] == 0, what="c exported its own")
                assert ec.stats.stored == 30
            await _stream_ok(nats1.urls, c)
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()


def test_the_stream_check_names_duplicates_gaps_and_disorder() -> None:
    from syncfw.cloud.export_subjects import ExportedOp

    def e(o: str, s: int) -> ExportedOp:
        return ExportedOp(Op(o, s, s, "z/", 0, "z/k", "lww", b""), False)

    good = check_stream([e("a", 1), e("b", 1), e("a", 2)], {"a": 2, "b": 1})
    assert good.ok and "exactly once" in str(good)
    bad = check_stream([e("a", 2), e("a", 1), e("a", 1), e("b", 2)], {"a": 3, "b": 2})
    assert not bad.ok
    assert bad.duplicates == [("a", 1)] and bad.out_of_order == [("a", 2, 1)]
    assert bad.missing == {"a": [3], "b": [1]}
    assert check_stream([e("a", 2)], {"a": 1}).extra == {"a": [2]}


async def test_handover_follows_mesh_liveness(tmp_path: Path, nats1: NatsCluster) -> None:
    """Two exporting replicas and an edge on a real gRPC mesh: duty is split by the hash
    while both are alive; when one dies, the mesh marks it dead and the other exports its
    origins from the shared progress, nothing skipped and nothing twice."""
    from syncfw.mesh import MeshConfig

    mcfg = MeshConfig.test()
    a = await Node.open(tmp_path / "a.db", node_id="agg-a", fleet=FLEET)
    b = await Node.open(tmp_path / "b.db", node_id="agg-b", fleet=FLEET)
    edges = [await Node.open(tmp_path / f"e{i}.db", node_id=f"edge-{i}", fleet=FLEET)
             for i in range(6)]
    both = ("agg-a", "agg-b")
    a_open = True
    try:
        ma = await a.serve("127.0.0.1:0", [], config=mcfg)
        mb = await b.serve("127.0.0.1:0", [ma.address], config=mcfg)
        for e in edges:
            await e.serve("127.0.0.1:0", [ma.address, mb.address], config=mcfg)
            await _write(e, 30)
        def sees(m: object, other: str) -> bool:
            return any(x.node_id == other and x.state.value == "alive"
                       for x in m.members())  # type: ignore[attr-defined]

        await wait_until(lambda: sees(ma, "agg-b") and sees(mb, "agg-a"), what="mesh met")
        ea = Exporter(a, ExportConfig.test(nats1.urls, exporters=both), mesh=lambda: ma)
        eb = Exporter(b, ExportConfig.test(nats1.urls, exporters=both), mesh=lambda: mb)
        await ea.start()
        await eb.start()
        try:
            await wait_until(lambda: ea.status()["exporters"] == list(both)
                             and eb.status()["exporters"] == list(both), what="both see both")
            await wait_until(lambda: all(n.store.version_vector.get(e.node_id) == 30
                                         for n in (a, b) for e in edges), what="synced")
            await wait_until(lambda: ea.lag()[0] == 0 and eb.lag()[0] == 0, what="exported")
            # (test timings flap membership under load: wait for a moment both agree)
            await wait_until(lambda: set(ea.status()["owned_origins"]).isdisjoint(
                eb.status()["owned_origins"]), what="duty split")
            owned_a = ea.status()["owned_origins"]
            assert owned_a and len(owned_a) < len(edges)
            dups_before = eb.stats.duplicates
        finally:
            await ea.aclose()
        await a.close()  # agg-a dies
        a_open = False
        for e in edges:
            await _write(e, 10, start=30)
        await wait_until(lambda: eb.status()["exporters"] == ["agg-b"], timeout_s=20,
                         what="agg-b sees agg-a dead")
        await wait_until(lambda: all(b.store.version_vector.get(e.node_id) == 40 for e in edges),
                         timeout_s=20, what="b synced")
        await wait_until(lambda: eb.lag()[0] == 0, what="b exported agg-a's origins too")
        assert set(owned_a) <= set(eb.status()["owned_origins"])
        # agg-a died caught up, its progress written: agg-b starts where it stopped
        assert eb.stats.duplicates == dups_before
        await eb.aclose()
        await _stream_ok(nats1.urls, b)
    finally:
        for e in edges:
            await e.close()
        await b.close()
        if a_open:
            await a.close()
