"""Shared fixtures: a controllable wall clock (syncfw.testing.FakeClock) and a factory of
real SQLite-backed nodes."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import sqlite3
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType

import grpc
import pytest

from syncfw import Fleet, Grant, Node, StoreConfig
from syncfw.exchange import run_exchange
from syncfw.keyfiles import NodeKeys
from syncfw.log import encode_value
from syncfw.testing import FakeClock
from syncfw.transport.base import FrameStream
from syncfw.transport.rpc import GrpcServer, TransportConfig

__all__ = ["FLEET", "START_MS", "FakeClock", "NodeFactory", "exchange", "load_bench"]

START_MS = 1_790_000_000_000


FLEET = Fleet(
    fleet_id="test-fleet",
    authority="cloud",
    grants=(
        Grant.of("trucks/t7/", "t7"),
        Grant.of("trucks/t9/", "t9"),
        Grant.of("site/", "*"),
    ),
)

NodeFactory = Callable[..., Awaitable[Node]]


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as module ``bench_<name>`` (loaded once), for its peers and rigs."""
    key = f"bench_{name}"
    got = sys.modules.get(key)
    if got is not None:
        return got
    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(key, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START_MS)


@pytest.fixture
async def make_node(tmp_path: Path, clock: FakeClock) -> AsyncIterator[NodeFactory]:
    """Open real nodes in ``tmp_path``; all are closed at the end of the test."""
    opened: list[Node] = []

    async def factory(
        node_id: str,
        *,
        fleet: Fleet = FLEET,
        config: StoreConfig | None = None,
        wall: Callable[[], int] | None = None,
        path: Path | None = None,
        keys: NodeKeys | None = None,
    ) -> Node:
        node = await Node.open(
            path or tmp_path / f"{node_id}.db",
            node_id=node_id,
            fleet=fleet,
            config=config,
            clock=wall or clock,
            keys=keys,
        )
        opened.append(node)
        return node

    yield factory
    for node in opened:
        await node.close()


async def exchange(a: Node, b: Node) -> None:
    """Both directions of a full in-process anti-entropy exchange."""
    for src, dst in ((a, b), (b, a)):
        while ops := await src.ops_since(await dst.version_vector(), limit=1000):
            await dst.apply_remote(ops)


async def raw_exchange(
    address: str, frames: list[bytes], *, timeout_s: float = 20.0
) -> tuple[grpc.StatusCode, str]:
    """Send ``frames`` (encoded sync frames) on one raw ``Exchange`` call; its status and details.

    The frames come from a request iterator, not ``call.write()``: the server
    may end the call after any frame (a wrong protocol ends it at Hello), and a
    write racing that end fails locally with INTERNAL, hiding the server's
    status; grpc stops consuming an iterator quietly once the call is over.
    """
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as ch:

        async def requests() -> AsyncIterator[bytes]:
            for f in frames:
                yield f

        call = ch.stream_stream("/syncfw.v1.Sync/Exchange")(requests(), timeout=timeout_s)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError:
            pass
        return await call.code(), await call.details() or ""


# Threads a test left running. The interpreter waits for every non-daemon thread
# before it exits (an aiosqlite connection nobody closed is one), so one left behind
# hangs the run after its summary, until CI's own limit. Each is put down to the test
# after which it was first seen. Once the run is over a watchdog (a daemon thread, gone
# with a normal exit) waits EXIT_GRACE_S; if the interpreter is still waiting then, it
# lists the threads with their stacks and exits with the run's own status.
EXIT_GRACE_S = float(os.environ.get("SYNCFW_TEST_EXIT_GRACE_S", "60"))
_FIRST_SEEN: dict[int, str] = {}
_EXIT_STATUS = [0]


def _lingering() -> list[threading.Thread]:
    main = threading.main_thread()
    return [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]


@pytest.hookimpl(trylast=True)
def pytest_runtest_logfinish(nodeid: str, location: object) -> None:
    for t in _lingering():
        if t.ident is not None:
            _FIRST_SEEN.setdefault(t.ident, nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT_STATUS[0] = int(exitstatus)


def _watchdog() -> None:
    time.sleep(EXIT_GRACE_S)
    left = _lingering()
    frames = sys._current_frames()
    out = [
        f"WARNING: the run ended {EXIT_GRACE_S:.0f} s ago and the interpreter still waits "
        f"for {len(left)} non-daemon thread(s); exiting without them"
    ]
    for t in left:
        seen = _FIRST_SEEN.get(t.ident or -1, "before any test ended")
        out.append(f"--- {t.name}, first seen after {seen}")
        frame = frames.get(t.ident or -1)
        out.append("".join(traceback.format_stack(frame)) if frame else "(no stack)")
    sys.stderr.write("\n".join(out) + "\n")
    sys.stderr.flush()
    os._exit(_EXIT_STATUS[0])


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    threading.Thread(target=_watchdog, name="syncfw-test-exit-watchdog", daemon=True).start()


async def serve_node(node: Node, cfg: TransportConfig) -> GrpcServer:
    """A real gRPC server on loopback whose every call is an exchange with ``node``."""

    async def handler(stream: FrameStream) -> None:
        await run_exchange(node, stream, timeout_s=cfg.exchange_timeout_s, metrics=node.metrics)

    return await GrpcServer.start("127.0.0.1:0", handler, config=cfg, metrics=node.metrics)


def ops_leaf(path: Path) -> tuple[int, int]:
    """The offset of a middle leaf page of the ``ops`` table, and the page size."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        pages = [
            r[0]
            for r in conn.execute(
                "SELECT pageno FROM dbstat WHERE name = 'ops' AND pagetype = 'leaf' ORDER BY pageno"
            )
        ]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
    assert len(pages) > 4
    return (pages[len(pages) // 2] - 1) * size, size


async def hold_a_forged_op(t9: Node, depot: Node) -> None:
    """``t9`` writes five ops; ``depot`` takes the first, then a forged op 4 (another
    value, a bogus ``prev``) that it holds behind the gap at 2..3."""
    for i in range(5):
        await t9.put(f"trucks/t9/k{i}", i)
    ops = await t9.ops_since({})
    await depot.apply_remote(ops[:1])
    forged = dataclasses.replace(ops[3], value=encode_value("forged"), prev=b"\x07" * 32)
    await depot.apply_remote([forged])
    assert depot.store.pending() == {"t9": {4: "gap: waiting for earlier ops of this origin"}}


def copy_db(src: Path, dst: Path) -> None:
    """Copy a closed node's SQLite file with its ``-wal`` and ``-shm`` beside it; a side
    file the source lacks is removed at the destination."""
    for suffix in ("", "-wal", "-shm"):
        s, d = Path(f"{src}{suffix}"), Path(f"{dst}{suffix}")
        if s.exists():
            shutil.copyfile(s, d)
        elif d.exists():
            d.unlink()


async def restore_older_backup(
    make_node: NodeFactory,
    path: Path,
    node_id: str,
    *,
    backed_up: int,
    written: int,
    after_writes: Callable[[Node], Awaitable[None]],
) -> Node:
    """The operator's mistake: ``node_id`` writes ``fleet/<id>/k`` = 0.. ``backed_up - 1``,
    a backup of its file is taken, it writes on to ``written - 1`` and runs
    ``after_writes`` (a sync that hands those ops to a peer), and then the backup is
    restored over its file. Returns the node reopened on the restored file."""
    key = f"fleet/{node_id}/k"
    backup = path.with_name(f"{path.name}.backup")
    node = await make_node(node_id, path=path)
    for i in range(backed_up):
        await node.put(key, i)
    await node.close()
    copy_db(path, backup)
    node = await make_node(node_id, path=path)
    for i in range(backed_up, written):
        await node.put(key, i)
    await after_writes(node)
    await node.close()
    copy_db(backup, path)
    return await make_node(node_id, path=path)
