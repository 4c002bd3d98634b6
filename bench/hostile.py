"""Hostile peers against a real node: does an honest peer keep being served?

A real SQLite node serves gRPC on loopback. An honest peer (another real node)
runs exchanges with it in a loop while, in turn, these attack it from other
loopback addresses (127.0.0.2 and up, as other hosts would):

- ``zero_window``: streams that say Hello, then never open their HTTP/2
  receive window (the server's writes block on flow control);
- ``slowloris``: streams that open and send nothing, reopened as they end;
- ``flood``: a sender that ignores HTTP/2 flow control and streams DATA as
  fast as the socket takes it;
- ``bad_batches``: well-formed Ops frames of as many chained ops as the node
  takes in one batch (``BatchLimits.max_ops``) whose last op breaks the chain,
  sent again and again (each is refused).

Prints one line per phase, then one JSON object (the last line): the
honest peer's ok ratio under the worst attack over its quiet rate, p99
latencies, the node's RSS growth, and the CPU spent per rejected frame
(measured over a window in which the bad-batch attack runs alone, as the
node's CPU beyond its idle rate, so the honest exchanges' CPU need not be
estimated and subtracted).
``--quick`` runs short phases with small batches (the smoke test).

The raw HTTP/2 attacker (:class:`RawPeer`) is importable: the hostile-serving
tests use it too. It needs the ``h2`` package (a dev dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import json
import logging
import os
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame

from syncfw.codec import DEFAULT_LIMITS, encode_batch
from syncfw.exchange import run_exchange
from syncfw.node import Node
from syncfw.store import StoreConfig
from syncfw.sync import PROTOCOL_VERSION, Digest, Hello, Ops, Summary
from syncfw.testing.ops import OpWriter
from syncfw.transport.admission import cpu_budget_of
from syncfw.transport.base import FrameStream
from syncfw.transport.rpc import ChannelPool, GrpcServer, TransportConfig
from syncfw.transport.wire import encode_frame
from syncfw.zones import Fleet

FLEET = Fleet(fleet_id="f")
BENCH_STORE = StoreConfig(synchronous="NORMAL")
"""Both nodes commit without an fsync each: the honest loop's rate is then the node's
serving (what an attack can take), not the shared disk's fsync time, which moves 2x
from one phase to the next here. Durability is not what this bench measures."""
EXCHANGE_PATH = "/syncfw.v1.Sync/Exchange"


def grpc_message(body: bytes) -> bytes:
    """One length-prefixed gRPC message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(body)) + body


def hello(node_id: str = "evil") -> bytes:
    """A valid Hello frame's bytes for the bench's fleet."""
    return encode_frame(Hello(PROTOCOL_VERSION, FLEET.fleet_id, node_id))


def opening(node_id: str = "evil") -> bytes:
    """Hello, Digest and Summary as gRPC messages: what a peer sends before its ops."""
    return b"".join(
        grpc_message(encode_frame(f))
        for f in (
            Hello(PROTOCOL_VERSION, FLEET.fleet_id, node_id),
            Digest(b"\x01" * 16),
            Summary({}),
        )
    )


def broken_chain_batch(n: int) -> bytes:
    """An Ops frame of ``n`` chained ops whose last op's ``prev`` breaks the chain."""
    w = OpWriter("evil")
    ops = [w.write(f"fleet/evil/k{i}", i) for i in range(n)]
    ops[-1] = dataclasses.replace(ops[-1], prev=b"\x66" * 32)
    return encode_frame(Ops(encode_batch(ops, zstd=True, elide_prev=True)))


class RawPeer:
    """A raw HTTP/2 client of the ``Exchange`` method, for playing a hostile peer.

    It answers the server's settings and pings (it reads the socket) but grants
    no window beyond ``window``: with 0, the server can never send it DATA.

    Args:
        host: server host.
        port: server port.
        source: local address to bind (another loopback address = another host).
        window: the HTTP/2 initial stream window it advertises.
    """

    def __init__(self, host: str, port: int, *, source: str = "127.0.0.2", window: int = 0) -> None:
        self.host, self.port, self.source, self.window = host, port, source, window
        self.ended: dict[int, tuple[str, str]] = {}
        self.open_ids: set[int] = set()
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> RawPeer:
        """Open the TCP connection and the HTTP/2 preface."""
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, local_addr=(self.source, 0)
        )
        cfg = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(cfg)
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={SettingCodes.INITIAL_WINDOW_SIZE: self.window, SettingCodes.ENABLE_PUSH: 0},
        )
        self.conn.initiate_connection()
        self._flush()
        self._task = asyncio.create_task(self._pump())
        return self

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def open(self, first: bytes | None = None) -> int | None:
        """Open one Exchange stream, sending ``first`` (raw gRPC message bytes) if given.

        Returns:
            The stream id, or None if the connection is gone or full.
        """
        if self.closed:
            return None
        try:
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(
                sid,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", EXCHANGE_PATH),
                    (":authority", f"{self.host}:{self.port}"),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                ],
            )
            if first is not None:
                self.conn.send_data(sid, first)
        except (h2.exceptions.ProtocolError, h2.exceptions.FlowControlError):
            return None
        self.open_ids.add(sid)
        self._flush()
        return sid

    async def blast(self, sid: int, chunk: bytes, total: int) -> int:
        """Send ``total`` bytes of DATA on ``sid`` in ``chunk`` pieces, ignoring flow control.

        Frames are written straight to the socket, past h2's window checks, as
        a peer that ignores the window would. Returns the bytes written.
        """
        sent = 0
        frame = DataFrame(sid)
        frame.data = chunk
        raw = frame.serialize()
        while sent < total and not self.closed and not self.writer.is_closing():
            self.writer.write(raw)
            sent += len(chunk)
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()
        return sent

    async def _pump(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for ev in events:
                    self._on(ev)
                self._flush()
        except (ConnectionError, OSError):
            pass
        self.closed = True

    def _on(self, ev: h2.events.Event) -> None:
        ended: tuple[str, str] | None = None
        sid = getattr(ev, "stream_id", 0)
        if isinstance(ev, h2.events.TrailersReceived) or (
            isinstance(ev, h2.events.ResponseReceived) and ev.stream_ended is not None
        ):
            headers = dict(ev.headers or [])
            ended = (str(headers.get("grpc-status")), str(headers.get("grpc-message", "")))
        elif isinstance(ev, h2.events.StreamReset) and sid not in self.ended:
            ended = ("reset", str(ev.error_code))  # after a status, a reset adds nothing
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.closed = True
        if ended is not None:
            self.ended[sid] = ended
            self.open_ids.discard(sid)

    async def aclose(self) -> None:
        """Drop the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


# -- attacks: each runs until cancelled --------------------------------------------


async def zero_window(port: int, source: str, streams: int) -> None:
    """Streams that say Hello and never grant a window; reopened as they end."""
    peers: list[RawPeer] = []
    try:
        while True:
            peers = [p for p in peers if not p.closed] or [await RawPeer("127.0.0.1", port, source=source).connect()]
            p = peers[-1]
            while len(p.open_ids) < streams and p.open(grpc_message(hello())) is not None:
                pass
            if p.closed or len(p.open_ids) < streams:
                peers.append(await RawPeer("127.0.0.1", port, source=source).connect())
            await asyncio.sleep(0.05)
    finally:
        for p in peers:
            await p.aclose()


async def slowloris(port: int, source: str, streams: int) -> None:
    """Streams that open and send nothing, reopened as they end."""
    p = await RawPeer("127.0.0.1", port, source=source, window=65535).connect()
    try:
        while True:
            if p.closed:
                await p.aclose()
                p = await RawPeer("127.0.0.1", port, source=source, window=65535).connect()
            while len(p.open_ids) < streams and p.open() is not None:
                pass
            await asyncio.sleep(0.05)
    finally:
        await p.aclose()


async def flood(port: int, source: str, stats: dict[str, int]) -> None:
    """DATA past the window, as fast as the socket takes it, on new connections as they die."""
    chunk = b"\x00" * 16384
    while True:
        p = await RawPeer("127.0.0.1", port, source=source, window=65535).connect()
        try:
            sid = p.open(opening())
            if sid is not None:
                stats["bytes"] = stats.get("bytes", 0) + await p.blast(sid, chunk, 64 << 20)
            stats["connections"] = stats.get("connections", 0) + 1
        finally:
            await p.aclose()


async def forwarder(port: int, source: str) -> tuple[asyncio.Server, int]:
    """A TCP relay on 127.0.0.1 whose upstream connections to ``port`` come from ``source``.

    grpc's client cannot bind a source address: through this, its calls reach
    the node from another host, as a remote attacker's would.
    """

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        except OSError:
            w.close()
            return
        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def bad_batches(port: int, source: str, frame: bytes, stats: dict[str, int]) -> None:
    """Two calls at a time, each the opening and one broken-chain batch; again as they end.

    Sent with grpc's own client, which keeps to the server's flow-control window
    (the batch is larger than one window): the cost measured is the node's work
    to refuse a well-delivered bad batch, not a protocol error. The calls go
    through :func:`forwarder`, so they come from ``source``, not the honest
    peer's address.
    """
    import grpc  # the attacker process only

    relay, port = await forwarder(port, source)

    frames = [
        encode_frame(f)
        for f in (Hello(PROTOCOL_VERSION, FLEET.fleet_id, "evil"), Digest(b"\x01" * 16), Summary({}))
    ] + [frame]

    async def one(method: Any) -> None:
        async def requests() -> AsyncIterator[bytes]:
            for f in frames:
                yield f

        call = method(requests(), timeout=10)
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for _ in call:
                pass
        stats["sent"] = stats.get("sent", 0) + 1

    async with relay, grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:
        method = ch.stream_stream(EXCHANGE_PATH)
        while True:
            await asyncio.gather(one(method), one(method))


# -- the bench ------------------------------------------------------------------------


def rss_mb() -> float:
    """This process's resident set size, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def p99(xs: list[float]) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


async def honest_loop(node: Node, address: str, seconds: float) -> list[tuple[float, float, bool]]:
    """Exchanges for ``seconds``: per exchange, when it ended (``time.monotonic``,
    one clock for every process of this machine), its latency in ms, and whether it
    succeeded."""
    pool = ChannelPool(TransportConfig.test())
    out: list[tuple[float, float, bool]] = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            await node.put(f"fleet/{node.node_id}/n", len(out))
            t0 = time.monotonic()
            try:
                got = await run_exchange(node, await pool.open(address, timeout_s=3.0), timeout_s=3.0)
                ok = got.ok
            except Exception:  # a dial failure counts as a failed exchange
                ok = False
            t1 = time.monotonic()
            out.append((t1, (t1 - t0) * 1000, ok))
    finally:
        await pool.aclose()
    return out


async def attack_main(name: str, port: int, source: str, batch_ops: int) -> None:
    """Serve one attack: ``go`` on stdin starts it, ``stop`` ends it (its connections
    closed), end of input quits. Prints ``ready`` once prepared and answers each
    command once it took effect.

    The bench starts every attacker once, before any phase, so no phase pays for
    an interpreter starting or a batch being built. At the lowest CPU priority:
    an attacker stands for another machine, so on the bench's shared cores its
    own CPU must not be taken from the node.
    """
    os.nice(19)
    frame = broken_chain_batch(batch_ops) if name == "bad_batches" else b""

    async def attack() -> None:
        if name == "zero_window":
            await zero_window(port, source, 16)
        elif name == "slowloris":
            await slowloris(port, source, 16)
        elif name == "flood":
            await flood(port, source, {})
        elif name == "flood_rig":  # the same flood into a sink of this process: the rig's cost
            sink = await asyncio.start_server(_discard, "127.0.0.1", 0)
            async with sink:
                await flood(sink.sockets[0].getsockname()[1], source, {})
        elif name == "bad_batches":
            await bad_batches(port, source, frame, {})
        else:
            raise SystemExit(f"unknown attack {name!r}")

    loop = asyncio.get_running_loop()
    task: asyncio.Task[None] | None = None
    print("ready", flush=True)
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        if line == "go" and task is None:
            task = asyncio.create_task(attack())
        elif line == "stop" and task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            task = None
        print(line, flush=True)


class Attacker:
    """One attack's process, started once and switched on and off per phase."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name, self.proc = name, proc

    @classmethod
    async def start(cls, name: str, port: int, batch_ops: int) -> Attacker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--attack", name, "--port", str(port),
            "--source", {**ATTACKS, **RIGS}[name], "--batch-ops", str(batch_ops),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        me = cls(name, proc)
        await me._said("ready")
        return me

    async def _said(self, word: str) -> None:
        assert self.proc.stdout is not None
        got = (await self.proc.stdout.readline()).decode().strip()
        if got != word:
            raise RuntimeError(f"attacker {self.name} said {got!r}, not {word!r}")

    async def command(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{word}\n".encode())
        await self.proc.stdin.drain()
        await self._said(word)

    async def aclose(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while await reader.read(1 << 20):
            pass
    writer.close()


ATTACKS = {"zero_window": "127.0.0.2", "slowloris": "127.0.0.3", "flood": "127.0.0.4",
           "bad_batches": "127.0.0.5"}
RIGS = {"flood_rig": "127.0.0.6"}
"""Not attacks on the node: what an attacker process costs this machine by itself."""


def _refused_by_chain(node: Node) -> int:
    got = node.metrics.snapshot()["exchanges"]
    return sum(v for k, v in got.items() if k not in ("OK", "CANCELLED", "DEADLINE_EXCEEDED"))


def _exchanges(node: Node, outcome: str) -> int:
    return int(node.metrics.snapshot()["exchanges"].get(outcome, 0))


def _cpu_refusals(node: Node) -> int:
    return int(node.metrics.snapshot()["refused_streams"].get("cpu_budget", 0))


async def honest_main(port: int, db: Path) -> None:
    """The honest peer's process: a node that runs exchanges for each number of seconds read."""
    logging.basicConfig(level=logging.ERROR)
    node = await Node.open(db, node_id="b", fleet=FLEET, config=BENCH_STORE)
    loop = asyncio.get_running_loop()
    try:
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            print(json.dumps(await honest_loop(node, f"127.0.0.1:{port}", float(line))), flush=True)
    finally:
        await node.close()


class Honest:
    """The honest peer, in a process of its own (its CPU is not the node's)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, port: int, db: Path) -> Honest:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--honest", "--port", str(port), "--db", str(db),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=64 << 20,  # one line of JSON holds every exchange of the run
        )
        return cls(proc)

    async def run(self, seconds: float) -> list[tuple[float, float, bool]]:
        """Exchanges for ``seconds`` (see :func:`honest_loop`)."""
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{seconds}\n".encode())
        await self.proc.stdin.drain()
        return [(t, ms, bool(ok)) for t, ms, ok in json.loads(await self.proc.stdout.readline())]

    async def aclose(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


@dataclasses.dataclass
class Window:
    """A stretch of the run with one attack on (or none: ``quiet``), as the node saw it."""

    name: str
    start: float
    end: float = 0.0
    cpu0: float = 0.0
    cpu1: float = 0.0
    rss_growth_mb: float = 0.0
    ok: int = 0
    lat: list[float] = dataclasses.field(default_factory=list)

    @property
    def ok_per_s(self) -> float:
        return self.ok / max(self.end - self.start, 1e-9)


async def main(quick: bool, rig: bool = False, front_door: bool = True) -> dict[str, Any]:
    logging.basicConfig(level=logging.ERROR)
    # The honest peer syncs flat out for the whole run while the attacks are
    # switched on and off in turn. This machine moves the honest rate by up to
    # 1.5x from one few-second stretch to the next with nothing else running, so
    # each attack is on for several short windows, each between two quiet ones,
    # and is judged by the median over its rounds of its rate over the mean of
    # the quiet windows beside it. Exchanges count in the window they end in.
    rounds = 1 if quick else 5
    on_s, off_s = (0.8, 0.6) if quick else (1.2, 0.9)
    hold_s = 0.3  # after "go": the attack takes hold before its window opens
    settle_s = 0.2  # after "stop": its connections closed before the quiet window opens
    batch_ops = 2_000 if quick else DEFAULT_LIMITS.max_ops  # the largest batch the node takes
    tmp = Path(tempfile.mkdtemp(prefix="syncfw-hostile-"))
    server_node = await Node.open(tmp / "a.db", node_id="a", fleet=FLEET, config=BENCH_STORE)
    budget = cpu_budget_of(server_node.metrics)  # the one the server and its runners share
    cfg = TransportConfig.test(exchange_timeout_s=3.0, hello_timeout_s=1.0, front_door=front_door)

    async def handler(stream: FrameStream) -> None:
        await run_exchange(
            server_node, stream, timeout_s=cfg.exchange_timeout_s, metrics=server_node.metrics
        )

    server = await GrpcServer.start("127.0.0.1:0", handler, config=cfg, metrics=server_node.metrics)
    names = [*ATTACKS, *(RIGS if rig else ())]
    attackers = dict(zip(names, await asyncio.gather(
        *(Attacker.start(n, server.port, batch_ops) for n in names)), strict=True))
    honest = await Honest.start(server.port, tmp / "b.db")
    await honest.run(0.5)  # warm-up: channels, caches
    alone_s = 1.0 if quick else 2.0  # a few refusals held Quotas.refusal_hold_s (1 s) each
    cpu0 = time.process_time()
    await asyncio.sleep(0.5)
    idle_cpu_per_s = (time.process_time() - cpu0) / 0.5  # the node serving no one: its timers
    rss0 = rss_mb()
    windows: list[Window] = []

    def open_window(name: str) -> None:
        windows.append(Window(name, time.monotonic(), cpu0=time.process_time()))

    def close_window() -> None:
        w = windows[-1]
        w.end, w.cpu1, w.rss_growth_mb = time.monotonic(), time.process_time(), rss_mb() - rss0

    schedule_s = off_s + rounds * len(names) * (on_s + off_s)
    run = asyncio.create_task(honest.run(schedule_s + 0.5))
    bad0 = (_exchanges(server_node, "DATA_LOSS"), budget.charged_s)
    try:
        open_window("quiet")
        await asyncio.sleep(off_s)
        for _ in range(rounds):
            for name in names:
                close_window()
                await attackers[name].command("go")
                await asyncio.sleep(hold_s)
                open_window(name)
                await asyncio.sleep(on_s - hold_s)
                close_window()
                await attackers[name].command("stop")
                await asyncio.sleep(settle_s)
                open_window("quiet")
                await asyncio.sleep(off_s - settle_s)
        close_window()
        exchanges = await run
        bad1 = (_exchanges(server_node, "DATA_LOSS"), budget.charged_s)
        # the bad-batch attack alone: all the node's CPU beyond idle is its
        await attackers["bad_batches"].command("go")
        await asyncio.sleep(hold_s)
        refused1 = _refused_by_chain(server_node) + _cpu_refusals(server_node)
        cpu1 = time.process_time()
        await asyncio.sleep(alone_s)
        alone_cpu_s = time.process_time() - cpu1 - idle_cpu_per_s * alone_s
        alone_rejected = _refused_by_chain(server_node) + _cpu_refusals(server_node) - refused1
        await attackers["bad_batches"].command("stop")
    except BaseException:
        honest.proc.kill()
        raise
    finally:
        run.cancel()
        for atk in attackers.values():
            await atk.aclose()
    ends = [w.end for w in windows]
    for t, ms, ok in exchanges:  # each exchange into the window it ended in
        k = bisect.bisect_left(ends, t)
        if k < len(windows) and windows[k].start <= t:
            windows[k].ok += ok
            windows[k].lat.append(ms)
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for k, w in enumerate(windows):
        if w.name != "quiet":
            beside = (windows[k - 1].ok_per_s + windows[k + 1].ok_per_s) / 2
            ratios[w.name].append(w.ok_per_s / max(beside, 1e-9))
        print(w.name, json.dumps({
            "ok_per_s": round(w.ok_per_s, 1), "p99_ms": round(p99(w.lat), 2),
            "cpu_per_s": round((w.cpu1 - w.cpu0) / (w.end - w.start), 3),
            "rss_growth_mb": round(w.rss_growth_mb, 2),
        }), flush=True)
    ratio = {n: _median(r) for n, r in ratios.items()}
    of = {n: [w for w in windows if w.name == n] for n in [*names, "quiet"]}

    def cpu_per_s(name: str) -> float:
        return sum(w.cpu1 - w.cpu0 for w in of[name]) / sum(w.end - w.start for w in of[name])

    def lat(name: str) -> list[float]:
        return [x for w in of[name] for x in w.lat]

    figures: dict[str, Any] = {
        "honest_ok_ratio_min": min(ratio[n] for n in ATTACKS),
        "worst_attack": min(ATTACKS, key=lambda n: ratio[n]),
        **{f"honest_ok_ratio_{n}": ratio[n] for n in names},
        # each attack's worst window: how far one short stretch can fall
        **{f"honest_ok_ratio_{n}_low": min(ratios[n]) for n in ATTACKS},
        "rounds": rounds,
        "honest_ok_per_s_quiet": _median([w.ok_per_s for w in of["quiet"]]),
        "node_cpu_per_s_flood": cpu_per_s("flood"),
        "node_cpu_per_s_quiet": cpu_per_s("quiet"),
        "honest_p99_ms_worst": max(p99(lat(n)) for n in ATTACKS),
        "worst_p99_attack": max(ATTACKS, key=lambda n: p99(lat(n))),
        "honest_p99_ms_quiet": p99(lat("quiet")),
        "rss_growth_mb_max": max(0.0, *(w.rss_growth_mb for w in windows)),
        # measured while the attack runs alone (no honest exchanges whose CPU would
        # have to be subtracted): the node's CPU beyond idle, per frame it refused
        "cpu_ms_per_rejected_frame": max(0.0, alone_cpu_s) * 1000 / max(1.0, alone_rejected),
        "rejected_frames": alone_rejected,
        "idle_cpu_ms_per_s": idle_cpu_per_s * 1000,
        # what decoding one bad batch costs when it is decoded (not refused for the budget)
        "decode_ms_per_decoded_bad_frame": (bad1[1] - bad0[1]) * 1000 / max(1, bad1[0] - bad0[0]),
        # the node's CPU under the bad batches beyond what serving the honest peer costs
        "attacker_cpu_share": max(0.0, cpu_per_s("bad_batches") - cpu_per_s("quiet")),
        "refused_streams": float(sum(server_node.metrics.snapshot()["refused_streams"].values())),
        "refused_connections": float(
            sum(server_node.metrics.snapshot()["refused_connections"].values())
        ),
        "inbound_throttled_s": server_node.metrics.snapshot()["inbound_throttled_s"],
    }
    await honest.aclose()
    await server.aclose(grace_s=0)
    await server_node.close()
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short phases, small batches (smoke test)")
    ap.add_argument("--rig", action="store_true",
                    help="also run flood_rig: the flood's sender into a sink of its own")
    ap.add_argument("--no-front-door", action="store_true",
                    help="serve with grpc on the port itself (TransportConfig.front_door off)")
    ap.add_argument("--attack", choices=sorted({**ATTACKS, **RIGS}),
                    help="serve one attack, switched by go/stop lines on stdin")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--source", default="127.0.0.2")
    ap.add_argument("--batch-ops", type=int, default=DEFAULT_LIMITS.max_ops)
    ap.add_argument("--honest", action="store_true", help="be the honest peer (reads seconds on stdin)")
    ap.add_argument("--db", type=Path)
    args = ap.parse_args()
    if args.honest:
        asyncio.run(honest_main(args.port, args.db))
        raise SystemExit(0)
    if args.attack:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(attack_main(args.attack, args.port, args.source, args.batch_ops))
        raise SystemExit(0)
    print(json.dumps(asyncio.run(main(args.quick, args.rig, not args.no_front_door))))
    sys.stdout.flush()
