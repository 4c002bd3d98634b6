"""Five real node processes on loopback: SIGKILL one mid-exchange, partition, heal, converge.

Each node is a separate Python process running the SQLite node and the gRPC
mesh (this file is also the worker script). Every node dials its peers through
its own in-test HTTP CONNECT proxy, which is how the test cuts the network: a
partition makes each proxy refuse, and cut, tunnels to the other side.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from syncfw.testing import wait_until
from syncfw.testing.partition import EgressProxy, Partition

ROOT = Path(__file__).resolve().parent.parent


# -- node processes -------------------------------------------------------------------


@dataclass
class Proc:
    node: str
    db: Path
    status: Path
    proxy: EgressProxy
    proc: asyncio.subprocess.Process | None = None
    address: str = ""
    log: Any = None

    async def start(self, seeds: list[str], burst: int = 0, listen: str = "127.0.0.1:0") -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        args = [
            sys.executable,
            str(Path(__file__)),
            "worker",
            str(self.db),
            "--id",
            self.node,
            "--status-file",
            str(self.status),
            "--proxy",
            self.proxy.url,
            "--burst",
            str(burst),
            "--stop-file",
            str(self.db.parent / "stop-writes"),
            "--listen",
            listen,
        ]
        for s in seeds:
            args += ["--seed", s]
        if self.log is not None:
            self.log.close()
        self.log = open(self.db.with_suffix(".log"), "ab")  # noqa: SIM115 - closed in stop()
        self.proc = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=self.log
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await self.proc.stdout.readline()).decode()
        assert line.startswith("listening "), (
            f"{self.node} did not start: {line!r} (see {self.db}.log)"
        )
        self.address = line.split()[1]
        self.proxy.partition.owners[self.address] = self.node

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.status.read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None


async def test_five_processes_kill_partition_heal_converge(tmp_path: Path) -> None:
    names = [f"n{i}" for i in range(5)]
    partition = Partition()
    proxies = {n: EgressProxy(n, partition) for n in names}
    for proxy in proxies.values():
        await proxy.start()
    procs = {n: Proc(n, tmp_path / f"{n}.db", tmp_path / f"{n}.json", proxies[n]) for n in names}
    burst = 20_000
    try:
        await procs["n0"].start([], burst=burst)
        for n in names[1:]:
            await procs[n].start([procs["n0"].address])

        def vv(n: str) -> dict[str, int]:
            st = procs[n].read()
            return st["version_vector"] if st else {}

        # 1. SIGKILL n4 while it is part-way through n0's burst
        await wait_until(
            lambda: 0 < vv("n4").get("n0", 0) < burst,
            timeout_s=60,
            what="n4 to be mid-burst",
        )
        before_kill = vv("n4")
        procs["n4"].kill()
        assert procs["n4"].proc is not None
        await procs["n4"].proc.wait()
        written_n4 = before_kill.get("n4", 0)  # writes n4 acknowledged before dying
        procs["n4"].status.unlink()  # what is read next is the new process's own status
        await procs["n4"].start([procs["n0"].address], listen=procs["n4"].address)  # same port
        # restarted from its file: nothing it had is lost. It has synced once it received
        # ops in its new life (its file alone may hold more of n0 than its last status
        # before the kill said) and knows n3, its only peer once the partition comes.
        def restarted_and_synced() -> bool:
            st = procs["n4"].read()
            if st is None:
                return False
            mesh = st["mesh"]
            return (
                vv("n4").get("n4", 0) >= written_n4
                and vv("n4").get("n0", 0) > before_kill.get("n0", 0)
                and mesh["ops_received"] > 0
                and any(m["node_id"] == "n3" for m in mesh["members"].values())
            )

        await wait_until(restarted_and_synced, timeout_s=20, what="n4 to restart and sync")

        # 2. partition {n0, n1, n2} | {n3, n4}; writes go on on both sides
        left, right = names[:3], names[3:]
        partition.split(left, right)
        t_cut = time.time()
        await wait_until(
            lambda: procs["n1"].status.stat().st_mtime > t_cut + 0.05,
            timeout_s=10,
            what="n1's status after the cut",
        )
        at_cut = vv("n1").get("n1", 0)  # at least every n1 write made before the cut
        await wait_until(
            lambda: vv("n2").get("n1", 0) >= at_cut + 10, timeout_s=30, what="the left side to sync"
        )
        # n3 writes on: wait for n4 to hold what n3 holds now (not to catch a moving tip,
        # which a loaded machine kept just out of reach for 30 s)
        n3_now = vv("n3").get("n3", 0)
        assert n3_now > 0
        await wait_until(
            lambda: vv("n4").get("n3", 0) >= n3_now, timeout_s=60, what="the right side to sync"
        )
        for n in right:
            assert vv(n).get("n1", 0) <= at_cut, f"the partition leaked to {n}"
        assert sum(p.refused for p in proxies.values()) > 0

        # 3. heal and converge: identical state, nothing acknowledged lost
        partition.heal()
        (tmp_path / "stop-writes").touch()

        def converged() -> bool:
            sts = [procs[n].read() for n in names]
            if any(s is None or s.get("writes_done") is not True for s in sts):
                return False
            return (
                len({json.dumps(s["version_vector"], sort_keys=True) for s in sts if s}) == 1
                and len({s["state_digest"] for s in sts if s}) == 1
            )

        # usually 5-20 s. Under load the burst's sender once crawled for minutes: the
        # cut had dropped its links' batch size to the floor, and with every ack slow
        # (a loaded receiver) the size never grew back, and late probes declared it dead,
        # cutting the catch-up (tests/test_mesh_liveness.py). The wait bounds a hang.
        # On a miss every worker writes its tasks' await chains to its log.
        try:
            await wait_until(converged, timeout_s=150, what="convergence after heal")
        except AssertionError:
            await _dump_tasks(procs.values())
            raise
        final = vv("n0")
        assert final.get("n0", 0) > burst
        for n in names:
            assert final.get(n, 0) >= 10
            assert procs[n].read()["version_vector"] == final  # type: ignore[index]
        assert final["n4"] >= written_n4
    finally:
        for p in procs.values():
            await p.stop()
        for px in proxies.values():
            await px.aclose()


async def _dump_tasks(procs: Any) -> None:
    """Ask every live worker to write its asyncio tasks' stacks to its log (a failed wait)."""
    for p in procs:
        if p.proc is not None and p.proc.returncode is None:
            p.proc.send_signal(signal.SIGUSR1)
    await asyncio.sleep(1.0)


def _print_tasks() -> None:
    """Each task's await chain (innermost last), and what its sessions hold (diagnosis)."""
    for task in asyncio.all_tasks():
        print(f"--- task {task.get_name()}", file=sys.stderr)
        coro: Any = task.get_coro()
        while coro is not None:
            frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
            if frame is not None:
                print(
                    f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}",
                    file=sys.stderr,
                )
                sess = frame.f_locals.get("session")
                if sess is not None and hasattr(sess, "bytes_unacked"):
                    print(
                        f"    session peer={getattr(sess, 'peer_id', None)} "
                        f"state={getattr(sess, 'state', None)} "
                        f"unacked={sess.bytes_unacked} inflight={getattr(sess, '_inflight', None)} "
                        f"rate={getattr(getattr(sess, '_sizer', None), 'rate_bps', None)} "
                        f"sent_last={getattr(sess, '_sent_last', None)} "
                        f"recv_last={getattr(sess, '_recv_last', None)} "
                        f"fetching={getattr(sess, '_fetching', None)} "
                        f"rx={len(getattr(sess, '_rx', ()))} "
                        f"applying={getattr(sess, '_applying', None) is not None} "
                        f"decoding={getattr(sess, '_decoding', None) is not None} "
                        f"patience={frame.f_locals.get('patience')}",
                        file=sys.stderr,
                    )
            coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        if coro is None:
            fut = getattr(task, "_fut_waiter", None)
            print(f"  waiting on {fut!r}"[:300], file=sys.stderr)
    sys.stderr.flush()


# -- the worker ---------------------------------------------------------------------------


async def _worker(args: Any) -> int:
    from syncfw.cli.node_cmd import write_status
    from syncfw.mesh import Mesh, MeshConfig
    from syncfw.node import Node
    from syncfw.transport.network import GrpcNetwork
    from syncfw.transport.rpc import TransportConfig
    from syncfw.zones import Fleet

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _print_tasks)
    cfg = MeshConfig.test().with_(
        interval_s=0.1, peer_bytes_per_s=600_000.0, peer_burst_bytes=64_000
    )
    async with Node.open(args.db, node_id=args.id, fleet=Fleet(fleet_id="mp")) as node:
        mesh = await Mesh.start(
            node,
            listen=args.listen,
            seeds=args.seed,
            config=cfg,
            network=GrpcNetwork(TransportConfig(http_proxy=args.proxy, connect_timeout_s=1.0)),
            changes=node.changes,
        )
        print(f"listening {mesh.address}", flush=True)
        done = {"writes_done": False}
        status = Path(args.status_file)

        async def report() -> None:
            while True:
                await write_status(status, node, mesh, done)
                await asyncio.sleep(0.1)

        reporter = asyncio.create_task(report())
        have = (await node.version_vector()).get(args.id, 0)
        for i in range(have, args.burst, 500):  # concurrent puts share group commits
            await asyncio.gather(
                *(
                    node.put(f"fleet/{args.id}/b{j}", os.urandom(16).hex())
                    for j in range(i, min(i + 500, args.burst))
                )
            )
        stop_writes = Path(args.stop_file)
        while not stop_writes.exists() and not stop.is_set():
            n = (await node.version_vector()).get(args.id, 0)
            await node.put(f"fleet/{args.id}/w{n}", n)
            await asyncio.sleep(0.05)  # the workload's pace: 20 writes per second
        done["writes_done"] = True
        await stop.wait()
        reporter.cancel()
        await mesh.aclose()
    return 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("mode")
    parser.add_argument("db")
    parser.add_argument("--id", required=True)
    parser.add_argument("--status-file", required=True)
    parser.add_argument("--proxy", default=None)
    parser.add_argument("--seed", action="append", default=[])
    parser.add_argument("--burst", type=int, default=0)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    sys.exit(asyncio.run(_worker(parser.parse_args())))
