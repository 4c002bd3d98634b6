"""Export in JetStream atomic batches, against a real ``nats-server`` on loopback: the frame
written for each op carries exactly the message of ``op_message``; a stream created by the
exporter takes batches; a batch holding an op already in the stream is refused whole and
its ops go one by one (each once); a stream without ``allow_atomic`` is exported op by op,
and the status and a WARNING say why."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest

from syncfw import Fleet, Node
from syncfw.cloud.export import ExportConfig, ExportConfigError, Exporter
from syncfw.cloud.export_batch import DUPLICATE, BatchRefused, _ack
from syncfw.cloud.export_check import check_stream, read_stream
from syncfw.cloud.export_cursor import TABLE
from syncfw.cloud.export_servers import NatsCluster
from syncfw.cloud.export_subjects import MessageFormatError, op_frame, op_message
from syncfw.log import Op
from syncfw.testing import wait_until

FLEET = Fleet(fleet_id="batch-test", authority="cloud")


@pytest.fixture
async def nats1(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    async with NatsCluster(tmp_path / "nats", 1) as c:
        yield c


def _parse(frame: bytes) -> tuple[str, dict[str, str], bytes]:
    line, rest = frame.split(b"\r\n", 1)
    verb, subject, hlen, total = line.decode().split(" ")
    assert verb == "HPUB"
    head, body = rest[: int(hlen)], rest[int(hlen) : int(total)]
    assert rest[int(total) :] == b"\r\n"
    lines = head.decode("ascii").split("\r\n")
    assert lines[0] == "NATS/1.0" and lines[-2:] == ["", ""]
    headers = dict(ln.split(": ", 1) for ln in lines[1:-2])
    assert len(headers) == len(lines) - 3  # no header twice
    return subject, headers, body


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("rejected", [False, True])
def test_the_frame_carries_exactly_the_message_of_op_message(signed: bool, rejected: bool) -> None:
    op = Op(
        "t7",
        5,
        123456789,
        "sites/é x/",
        2,
        "sites/é x/k\n1",
        "lww",
        b"\x01\r\n\x02",
        prev=b"\xaa" * 32,
        sig=b"\x05" * 64 if signed else None,
    )
    subject, body, headers = op_message("syncfw", "f", op, rejected=rejected)
    fs, fh, fb = _parse(op_frame("syncfw", "f", op, rejected=rejected))
    assert (fs, fb) == (subject, body) and list(fh.items()) == list(headers.items())
    fs, fh, fb = _parse(op_frame("syncfw", "f", op, rejected=rejected, batch=("b1", 7)))
    assert fh == {**headers, "Nats-Batch-Id": "b1", "Nats-Batch-Sequence": "7"}


def test_a_header_nats_cannot_carry_is_refused() -> None:
    op = Op("t7\r\nX-Evil: 1", 1, 1, "z/", 0, "z/k", "lww", b"")
    with pytest.raises(MessageFormatError, match="cannot carry"):
        op_frame("syncfw", "f", op)


def test_acks_are_checked() -> None:
    assert _ack(b'{"stream":"S","seq":9,"batch":"b","count":3}', "S", 3).seq == 9
    with pytest.raises(BatchRefused) as e:
        _ack(b'{"error":{"code":400,"err_code":10201,"description":"duplicate"}}', "S", 3)
    assert e.value.code == DUPLICATE
    # a server ignoring the batch headers acks the commit as one plain message
    with pytest.raises(BatchRefused, match="not a batch of 3"):
        _ack(b'{"stream":"S","seq":9}', "S", 3)
    with pytest.raises(BatchRefused, match="not a publish"):
        _ack(b"garbage", "S", 3)


def test_config_bounds_the_batch() -> None:
    with pytest.raises(ExportConfigError, match="atomic_batch_ops"):
        ExportConfig(servers=("nats://127.0.0.1:4222",), atomic_batch_ops=1001)
    with pytest.raises(ExportConfigError, match="batches_in_flight"):
        ExportConfig(servers=("nats://127.0.0.1:4222",), batches_in_flight=0)


async def _write(node: Node, n: int, start: int = 0) -> None:
    await node.put_many([(f"fleet/{node.node_id}/k{i}", i) for i in range(start, start + n)])


async def _stream_ok(servers: list[str], node: Node) -> int:
    rep = check_stream(await read_stream(servers, "SYNCFW"), node.store.version_vector)
    assert rep.ok, str(rep)
    return rep.messages


async def test_a_stream_made_here_takes_atomic_batches(tmp_path: Path, nats1: NatsCluster) -> None:
    node = await Node.open(tmp_path / "cloud.db", node_id="cloud", fleet=FLEET)
    edges = []
    try:
        for i in range(3):
            e = await Node.open(tmp_path / f"e{i}.db", node_id=f"edge-{i}", fleet=FLEET)
            edges.append(e)
            await _write(e, 900)
            await node.apply_remote(await e.ops_since({}))
        cfg = ExportConfig.test(nats1.urls, atomic_batch_ops=500, batches_in_flight=2)
        async with Exporter(node, cfg) as ex:
            await wait_until(lambda: ex.lag()[0] == 0, timeout_s=30, what="caught up")
            st = ex.status()
            assert st["publish_mode"] == "atomic batches" and st["publish_mode_reason"] is None
            assert st["stored"] == 2700 and st["duplicates"] == 0
            assert st["atomic_batches"] >= 2700 // 500  # never more than 500 a batch
        nc = await nats.connect(nats1.urls)
        info = await nc.jetstream().stream_info("SYNCFW")
        await nc.close()
        assert info.config.allow_atomic is True
        assert await _stream_ok(nats1.urls, node) == 2700
    finally:
        for e in edges:
            await e.close()
        await node.close()


async def test_a_batch_holding_an_exported_op_goes_op_by_op(
    tmp_path: Path, nats1: NatsCluster
) -> None:
    node = await Node.open(tmp_path / "cloud.db", node_id="cloud", fleet=FLEET)
    try:
        await _write(node, 100)
        cfg = ExportConfig.test(nats1.urls)
        async with Exporter(node, cfg) as ex:
            await wait_until(lambda: ex.lag()[0] == 0, what="caught up")
            assert ex.stats.atomic_batches >= 1
        # The cursor and the shared progress lost: only the duplicate window knows
        # the first 100 are in; the next batch holds them and 50 new ops.
        import sqlite3

        with sqlite3.connect(node.store.path) as conn:
            conn.execute(f"DELETE FROM {TABLE}")
        nc = await nats.connect(nats1.urls)
        await nc.jetstream().delete_key_value("SYNCFW_progress")
        await nc.close()
        await _write(node, 50, start=100)
        async with Exporter(node, cfg) as ex2:
            await wait_until(lambda: ex2.lag()[0] == 0, what="caught up again")
            assert ex2.stats.batch_fallbacks >= 1
            assert ex2.stats.duplicates == 100 and ex2.stats.stored == 50
            assert ex2.status()["batch_fallbacks"] == ex2.stats.batch_fallbacks
        assert await _stream_ok(nats1.urls, node) == 150
    finally:
        await node.close()


async def test_a_stream_without_allow_atomic_goes_op_by_op_and_says_why(
    tmp_path: Path, nats1: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(nats1.urls)
    await nc.jetstream().add_stream(name="SYNCFW", subjects=["syncfw.>"])
    await nc.close()
    node = await Node.open(tmp_path / "cloud.db", node_id="cloud", fleet=FLEET)
    try:
        await _write(node, 40)
        with caplog.at_level(logging.WARNING, logger="syncfw.cloud.export"):
            async with Exporter(node, ExportConfig.test(nats1.urls)) as ex:
                await wait_until(lambda: ex.lag()[0] == 0, what="caught up")
                st = (await node.status())["export"]
                assert (
                    st["publish_mode"] == "op by op" and "allow_atomic" in st["publish_mode_reason"]
                )
                assert st["atomic_batches"] == 0 and st["stored"] == 40
        assert [r for r in caplog.records if "op by op" in r.getMessage()]
        assert await _stream_ok(nats1.urls, node) == 40
        # and atomic_batch_ops 0 asks for op by op on any stream, without a warning
        await _write(node, 10, start=40)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="syncfw.cloud.export"):
            cfg = ExportConfig.test(nats1.urls, atomic_batch_ops=0)
            async with Exporter(node, cfg) as ex2:
                await wait_until(lambda: ex2.lag()[0] == 0, what="caught up")
                assert ex2.publish_mode == "op by op" and ex2.stats.stored == 10
        assert not [r for r in caplog.records if "op by op" in r.getMessage()]
    finally:
        await node.close()
