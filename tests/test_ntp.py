"""check_ntp against real NTP responders on loopback.

Each responder is a UDP socket served by a background thread. It answers like
an NTPv3/v4 server (mode 4, stratum 1, the client's transmit timestamp copied
into the originate field, receive/transmit timestamps from the local clock plus
a configured skew), stays silent, or answers garbage. All traffic is on
127.0.0.0/8.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import ntplib
import pytest

from syncfw import Fleet, Node
from syncfw.clock import NtpResult, check_ntp
from syncfw.errors import ClockError, SyncfwError
from syncfw.testing.waiting import wait_until

NTP_EPOCH_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01
PACKET = struct.Struct("!BBbb II 4s QQQQ")  # 48 bytes
TOLERANCE_S = 0.05
STOP = b"stop-responder"

Behaviour = Literal["answer", "silent", "garbage"]


def to_ntp(unix_s: float) -> int:
    """A 64-bit NTP timestamp (32.32 fixed point since 1900)."""
    return int((unix_s + NTP_EPOCH_OFFSET) * (1 << 32)) & ((1 << 64) - 1)


class Responder:
    """A one-socket NTP server on a thread, for one test."""

    def __init__(self, host: str, port: int, behaviour: Behaviour, skew_s: float = 0.0) -> None:
        self.behaviour = behaviour
        self.skew_s = skew_s
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.host, self.port = self.sock.getsockname()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name=f"ntp-{behaviour}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            data, addr = self.sock.recvfrom(512)
            if self._stopping and data == STOP:
                return
            received = time.time() + self.skew_s
            self.requests.append(data)
            if self.behaviour == "silent":
                continue
            if self.behaviour == "garbage":
                self.sock.sendto(b"\x1c\x01 not ntp", addr)
                continue
            self.sock.sendto(self._reply(data, received), addr)

    def _reply(self, query: bytes, received: float) -> bytes:
        first = query[0]
        version = (first >> 3) & 0x7
        client_transmit = query[40:48]
        (originate,) = struct.unpack("!Q", client_transmit)
        transmit = time.time() + self.skew_s
        return PACKET.pack(
            (0 << 6) | (version << 3) | 4,  # leap 0, the client's version, mode 4 (server)
            1,  # stratum 1: a primary reference
            query[2],  # poll interval: echo the client's
            -20,  # precision: about a microsecond
            0,  # root delay
            0,  # root dispersion
            b"LOCL",  # reference id
            to_ntp(received - 1.0),  # reference time
            originate,  # originate: the client's transmit timestamp, untouched
            to_ntp(received),
            to_ntp(transmit),
        )

    def close(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as waker:
            waker.sendto(STOP, (self.host, self.port))
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "the responder thread did not stop"
        self.sock.close()


Factory = Callable[..., Responder]


@pytest.fixture
def responders() -> Iterator[Factory]:
    """Start responders; every one is stopped and its socket closed at teardown."""
    started: list[Responder] = []

    def start(
        behaviour: Behaviour = "answer",
        *,
        skew_s: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> Responder:
        r = Responder(host, port, behaviour, skew_s)
        started.append(r)
        return r

    yield start
    for r in started:
        r.close()


def pair_on_one_port(
    start: Factory, first: Behaviour, second: Behaviour
) -> tuple[Responder, Responder]:
    """Two responders on 127.0.0.2 and 127.0.0.1 sharing a port (check_ntp takes one port)."""
    for _ in range(20):
        b = start(second, host="127.0.0.1")
        try:
            a = start(first, host="127.0.0.2", port=b.port)
        except OSError:  # that port is taken on 127.0.0.2: try another
            continue
        return a, b
    pytest.fail("could not find a port free on both 127.0.0.1 and 127.0.0.2")


def test_the_responder_speaks_ntp(responders: Factory) -> None:
    """The fixture itself: a real NTP client accepts its answers as a server's."""
    server = responders("answer", skew_s=0.25)
    stats = ntplib.NTPClient().request("127.0.0.1", version=4, port=server.port, timeout=2)
    assert stats.mode == 4
    assert stats.version == 4
    assert stats.stratum == 1
    assert stats.ref_id == int.from_bytes(b"LOCL", "big")
    sent = server.requests[0]
    assert sent[0] & 0x7 == 3  # the query was a client's (mode 3)
    (client_tx,) = struct.unpack("!Q", sent[40:48])
    assert stats.orig_timestamp == pytest.approx(client_tx / (1 << 32), abs=1e-6)
    assert stats.recv_timestamp <= stats.tx_timestamp


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("skew_s", [2.5, -1.0, 0.0])
def test_check_ntp_measures_the_skew(responders: Factory, skew_s: float, version: int) -> None:
    server = responders("answer", skew_s=skew_s)
    result = check_ntp(["127.0.0.1"], port=server.port, timeout_s=2.0, version=version)
    assert isinstance(result, NtpResult)
    assert result.server == "127.0.0.1"
    assert result.offset_s == pytest.approx(skew_s, abs=TOLERANCE_S)
    assert -0.001 <= result.delay_s < 1.0
    assert len(server.requests) == 1
    assert (server.requests[0][0] >> 3) & 0x7 == version


def test_a_silent_server_is_skipped_for_the_next(responders: Factory) -> None:
    silent, good = pair_on_one_port(responders, "silent", "answer")
    good.skew_s = 2.5
    started = time.monotonic()
    result = check_ntp(["127.0.0.2", "127.0.0.1"], port=good.port, timeout_s=0.3)
    elapsed = time.monotonic() - started
    assert result.server == "127.0.0.1"
    assert result.offset_s == pytest.approx(2.5, abs=TOLERANCE_S)
    assert elapsed >= 0.25  # it waited for the first server before moving on
    silent.close()
    good.close()
    assert len(silent.requests) == 1
    assert len(good.requests) == 1


def test_a_garbage_answer_is_skipped_for_the_next(responders: Factory) -> None:
    garbage, good = pair_on_one_port(responders, "garbage", "answer")
    good.skew_s = -1.0
    result = check_ntp(["127.0.0.2", "127.0.0.1"], port=good.port, timeout_s=1.0)
    assert result.server == "127.0.0.1"
    assert result.offset_s == pytest.approx(-1.0, abs=TOLERANCE_S)
    garbage.close()
    assert len(garbage.requests) == 1


def test_the_first_server_that_answers_wins(responders: Factory) -> None:
    first, second = pair_on_one_port(responders, "answer", "answer")
    first.skew_s, second.skew_s = 2.5, -1.0
    result = check_ntp(["127.0.0.2", "127.0.0.1"], port=first.port, timeout_s=1.0)
    assert result.server == "127.0.0.2"
    assert result.offset_s == pytest.approx(2.5, abs=TOLERANCE_S)
    second.close()
    assert second.requests == []


def test_no_answer_at_all_raises_clock_error_quickly(responders: Factory) -> None:
    a, b = pair_on_one_port(responders, "silent", "silent")
    started = time.monotonic()
    with pytest.raises(ClockError) as info:
        check_ntp(["127.0.0.2", "127.0.0.1"], port=a.port, timeout_s=0.2)
    elapsed = time.monotonic() - started
    assert isinstance(info.value, SyncfwError)
    message = str(info.value)
    assert message.startswith("no NTP server answered: ")
    assert "127.0.0.2: " in message
    assert "127.0.0.1: " in message
    assert 0.35 <= elapsed < 2.0  # both were tried, each for its timeout, and no longer
    a.close()
    b.close()
    assert len(a.requests) == len(b.requests) == 1


def test_no_servers_raises_clock_error() -> None:
    with pytest.raises(ClockError, match="no servers given"):
        check_ntp([], port=1)


# -- a node records what it measured ---------------------------------------------------


async def test_a_node_records_its_ntp_offset(responders: Factory, tmp_path: Path) -> None:
    server = responders("answer", skew_s=2.5)
    async with Node.open(tmp_path / "n.db", node_id="n", fleet=Fleet(fleet_id="f")) as node:
        result = await node.check_clock(["127.0.0.1"], port=server.port, timeout_s=2.0)
        assert result.offset_s == pytest.approx(2.5, abs=TOLERANCE_S)
        recorded = node.metrics.value("syncfw_clock_offset_ms", source="ntp")
        assert recorded == pytest.approx(result.offset_s * 1000)
        st = await node.status()
        ahead = node.metrics.value("syncfw_clock_offset_ms", source="hlc_ahead")
        assert ahead < 1000  # a fresh node's hybrid clock is not ahead of true time
        assert st["clock_offset_ms"] == {"ntp": recorded, "hlc_ahead": ahead}
        assert st["metrics"]["clock_offset_ms"] == {"ntp": recorded, "hlc_ahead": ahead}


async def test_a_high_water_mark_far_ahead_of_ntp_time_is_loud(
    responders: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The RTC ran an hour ahead, the node wrote, the RTC was fixed: the node keeps
    # stamping from its persisted mark (never backwards) and says so.
    import time

    hour_ms = 3_600_000
    fleet = Fleet(fleet_id="f")
    ahead = lambda: int(time.time() * 1000) + hour_ms  # noqa: E731
    async with Node.open(tmp_path / "n.db", node_id="n", fleet=fleet, clock=ahead) as node:
        await node.put("fleet/n/x", 1)
    server = responders("answer", skew_s=0.0)
    async with Node.open(tmp_path / "n.db", node_id="n", fleet=fleet) as node:
        with caplog.at_level(logging.WARNING, logger="syncfw.node"):
            await node.check_clock(["127.0.0.1"], port=server.port, timeout_s=2.0)
        got = node.metrics.value("syncfw_clock_offset_ms", source="hlc_ahead")
        assert got == pytest.approx(hour_ms, abs=60_000)
        assert (await node.status())["clock_offset_ms"]["hlc_ahead"] == got
        assert any("ahead of NTP-checked time" in r.getMessage() for r in caplog.records)
        op = await node.put("fleet/n/y", 2)  # still stamped from the mark, never behind it
        assert (op.hlc >> 16) >= int(time.time() * 1000) + hour_ms - 60_000


async def test_a_failed_check_keeps_the_last_offset_and_warns(
    responders: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = responders("answer", skew_s=-1.0)
    silent = responders("silent")
    async with Node.open(tmp_path / "n.db", node_id="n", fleet=Fleet(fleet_id="f")) as node:
        await node.check_clock(["127.0.0.1"], port=good.port)
        before = node.metrics.value("syncfw_clock_offset_ms", source="ntp")
        with caplog.at_level(logging.WARNING, logger="syncfw.node"), pytest.raises(ClockError):
            await node.check_clock(["127.0.0.1"], port=silent.port, timeout_s=0.2)
        assert node.metrics.value("syncfw_clock_offset_ms", source="ntp") == before
        assert before == pytest.approx(-1000, abs=TOLERANCE_S * 1000)
        assert any("clock not checked" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("skew_s", [86_400.0, -86_400.0])
def test_an_offset_of_a_day_is_reported_as_a_day(responders: Factory, skew_s: float) -> None:
    server = responders("answer", skew_s=skew_s)
    result = check_ntp(["127.0.0.1"], port=server.port, timeout_s=2.0)
    assert result.offset_s == pytest.approx(skew_s, abs=TOLERANCE_S)


async def test_the_periodic_check_is_loud_while_the_mark_is_ahead_and_never_moves_it_back(
    responders: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The RTC ran 2 s ahead (4 x max_offset_ms), the node wrote, the RTC was
    # fixed. The periodic check says so on every check while the mark is ahead
    # (WARNING, status, metric), and says so once more when true time has
    # passed the mark; no timestamp ever went back meanwhile.
    ahead_ms = 2_000
    fleet = Fleet(fleet_id="f")
    fast = lambda: int(time.time() * 1000) + ahead_ms  # noqa: E731
    async with Node.open(tmp_path / "n.db", node_id="n", fleet=fleet, clock=fast) as node:
        mark = (await node.put("fleet/n/x", 1)).hlc
    server = responders("answer", skew_s=0.0)
    async with Node.open(tmp_path / "n.db", node_id="n", fleet=fleet) as node:
        assert "clock" not in await node.status()  # nothing checked yet
        with caplog.at_level(logging.WARNING, logger="syncfw.node"):
            node.watch_clock(["127.0.0.1"], port=server.port, interval_s=0.2, timeout_s=1.0)
            await wait_until(lambda: len(server.requests) >= 1, timeout_s=5)
            await wait_until(
                lambda: node.metrics.value("syncfw_clock_offset_ms", source="hlc_ahead") > 0,
                timeout_s=5,
            )
            st = (await node.status())["clock"]
            assert st["state"] == "ahead"
            assert 1_000 < st["ahead_ms"] <= ahead_ms + 100
            assert "never move back" in st["reason"]
            assert st["server"] == "127.0.0.1"
            hlcs = [(await node.put("fleet/n/y", i)).hlc for i in range(3)]
            await wait_until(lambda: len(server.requests) >= 3, timeout_s=5)  # periodic
            loud = [r for r in caplog.records if "ahead of NTP-checked time" in r.getMessage()]
            assert len(loud) >= 2
            await wait_until(lambda: node._clock_watch.report.state.value == "ok", timeout_s=10)
            assert any("no longer ahead" in r.getMessage() for r in caplog.records)
            hlcs.append((await node.put("fleet/n/y", 9)).hlc)
        assert mark < hlcs[0] and hlcs == sorted(hlcs)  # never behind the mark, never back
        st = (await node.status())["clock"]
        assert st["state"] == "ok" and st["ahead_ms"] <= node.store.clock.max_offset_ms
        got = node.metrics.value("syncfw_clock_offset_ms", source="hlc_ahead")
        assert got == st["ahead_ms"]
    assert node._clock_task is None  # close() ended the schedule


async def test_the_periodic_check_says_when_no_server_answers(
    responders: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    silent = responders("silent")
    async with Node.open(tmp_path / "n.db", node_id="n", fleet=Fleet(fleet_id="f")) as node:
        with caplog.at_level(logging.WARNING, logger="syncfw.node"):
            node.watch_clock(["127.0.0.1"], port=silent.port, interval_s=0.05, timeout_s=0.1)
            await wait_until(lambda: node._clock_watch.report.failures >= 2, timeout_s=5)
        st = (await node.status())["clock"]
        assert st["state"] == "unreachable"
        assert st["offset_ms"] is None and "no NTP server answered" in st["reason"]
        assert sum("clock not checked" in r.getMessage() for r in caplog.records) >= 2
        with pytest.raises(ValueError, match="interval_s"):
            node.watch_clock(["127.0.0.1"], interval_s=0)


async def test_node_serve_checks_its_clock_against_ntp_periodically(
    responders: Factory, tmp_path: Path
) -> None:
    """`syncfw node serve --ntp HOST:PORT --ntp-every S`, a real process: its file's
    high-water mark is an hour ahead (the RTC ran ahead when it last wrote), said on every
    check."""
    import asyncio
    import os
    import signal
    import subprocess
    import sys

    hour_ms = 3_600_000
    ahead = lambda: int(time.time() * 1000) + hour_ms  # noqa: E731
    async with Node.open(
        tmp_path / "n.db", node_id="n", fleet=Fleet(fleet_id="f"), clock=ahead
    ) as n:
        await n.put("fleet/n/x", 1)
    server = responders("answer")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "syncfw",
        "node",
        "serve",
        str(tmp_path / "n.db"),
        "--id",
        "n",
        "--fleet",
        "f",
        "--admin",
        "none",
        "--ntp",
        f"127.0.0.1:{server.port}",
        "--ntp-every",
        "0.3",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            assert (await proc.stdout.readline()).startswith(b"listening ")
            while len(server.requests) < 3:  # checked at start, then every 0.3 s  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            _, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 0, text[-2000:]
    assert text.count("ahead of NTP-checked time") >= 2, text[-2000:]


def test_ntp_settings_name_one_port_and_refuse_two() -> None:
    from syncfw.cli.settings import ntp_servers

    assert ntp_servers(["a", "b"]) == (["a", "b"], 123)
    assert ntp_servers(["a:1230", "b"]) == (["a", "b"], 1230)
    with pytest.raises(ValueError, match="different ports"):
        ntp_servers(["a:1", "b:2"])
    with pytest.raises(ValueError, match="1-65535"):
        ntp_servers(["a:0"])
