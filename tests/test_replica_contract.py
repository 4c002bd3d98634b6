"""One replica contract: ``check_replica`` against MemoryReplica and the SQLite Node;
the testing kit's flat public surface."""

from __future__ import annotations

import importlib
import inspect
import itertools
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import syncfw.testing
from syncfw import ForkError, Node
from syncfw.keyfiles import NodeKeys
from syncfw.log import ApplyResult, Op, OpChain, op_hash
from syncfw.testing import (
    REPLICA_CHECKS,
    CheckedReplica,
    MemoryReplica,
    OpWriter,
    ReplicaFactory,
    check_replica,
)
from syncfw.trust import NodeSigner
from syncfw.zones import Fleet


@asynccontextmanager
async def _memory(
    node_id: str, fleet: Fleet, *, keys: NodeKeys | None = None
) -> AsyncIterator[CheckedReplica]:
    r = MemoryReplica(node_id, fleet)
    if keys is not None:
        r.signer = NodeSigner(fleet.fleet_id, keys.signing_key)
    yield r


def _sqlite(tmp_path: Path) -> ReplicaFactory:
    count = itertools.count()

    @asynccontextmanager
    async def factory(
        node_id: str, fleet: Fleet, *, keys: NodeKeys | None = None
    ) -> AsyncIterator[CheckedReplica]:
        async with Node.open(
            tmp_path / f"{next(count)}-{node_id}.db", node_id=node_id, fleet=fleet, keys=keys
        ) as node:
            yield node

    return factory


FACTORIES: dict[str, Callable[[Path], ReplicaFactory]] = {
    "memory": lambda _: _memory,
    "sqlite": _sqlite,
}


@pytest.mark.parametrize("check", list(REPLICA_CHECKS))
@pytest.mark.parametrize("kind", list(FACTORIES))
async def test_replica_contract(kind: str, check: str, tmp_path: Path) -> None:
    await check_replica(FACTORIES[kind](tmp_path), only=[check])


class _Forgetful(MemoryReplica):
    """Acks replace the last one: the bug the contract exists to catch."""

    async def acknowledge(self, peer: str, vv: Mapping[str, int]) -> None:
        self.acks[peer] = dict(vv)


class _SigStrict(MemoryReplica):
    """Counts ``sig`` in op identity, as MemoryReplica once did."""

    async def apply_remote(self, ops: list[Op]) -> ApplyResult:
        for op in ops:
            held = self._held(op.origin, op.seq)
            if held is not None and held != op:
                raise ForkError(f"two different ops at {op.id}")
        return await super().apply_remote(ops)


def _of(cls: type[MemoryReplica]) -> ReplicaFactory:
    @asynccontextmanager
    async def factory(
        node_id: str, fleet: Fleet, *, keys: NodeKeys | None = None
    ) -> AsyncIterator[CheckedReplica]:
        yield cls(node_id, fleet)

    return factory


async def test_check_replica_runs_every_check_and_names_the_failing_one() -> None:
    await check_replica(_memory)  # the whole suite in one call
    with pytest.raises(AssertionError, match=r"check_replica\[acks_move_forward\].*forward"):
        await check_replica(_of(_Forgetful))
    with pytest.raises(AssertionError, match=r"check_replica\[same_op_ignores_sig\]"):
        await check_replica(_of(_SigStrict), only=["same_op_ignores_sig"])
    with pytest.raises(KeyError):
        await check_replica(_memory, only=["no_such_check"])


def test_op_writer_mints_through_op_chain() -> None:
    w = OpWriter("n1", "shared/", epoch=1)
    ops = [w.write("a", 1), w.write("b", 2, zone="fleet/n1/"), w.delete("a")]
    reference = OpChain("n1")
    for op in ops:
        again = reference.mint(op.hlc, op.zone, op.epoch, op.key, op.kind, op.value)
        assert again == op
    assert [op.key for op in ops] == ["shared/a", "fleet/n1/b", "shared/a"]
    assert ops[1].prev == op_hash(ops[0]) and ops[2].value == b""
    assert w.seq == 3 and w.origin == "n1"
    signed = OpWriter("n1", signer=lambda op: b"sig%d" % op.seq).write("a", 1)
    assert signed.sig == b"sig1"


async def test_memory_replica_reads_a_tombstone_as_absent() -> None:
    r = MemoryReplica("r1")
    w = OpWriter("n1")
    await r.apply_remote([w.write("k", 1), w.delete("k")])
    assert r.get("fleet/n1/k") is None
    assert r.scan("fleet/") == {}


@pytest.mark.parametrize(
    "name",
    [
        "syncfw.testing",
        "syncfw.testing.replica_check",
        "syncfw.testing.waiting",
        "syncfw.testing.strategies",
        "syncfw.testing.memory",
        "syncfw.testing.ops",
    ],
)
def test_kit_modules_export_and_document_what_they_define(name: str) -> None:
    mod = importlib.import_module(name)
    assert mod.__doc__, f"{name} has no docstring"
    exported = set(mod.__all__)
    defined = {
        n
        for n, obj in vars(mod).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == name
    }
    assert defined <= exported, (
        f"{name} defines public {sorted(defined - exported)} outside __all__"
    )
    for attr in exported:
        obj = getattr(mod, attr)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{name}.{attr} has no docstring"


def test_every_public_name_exists() -> None:
    missing = [name for name in syncfw.testing.__all__ if not hasattr(syncfw.testing, name)]
    assert missing == []
    assert syncfw.testing.FakeClock is syncfw.testing.waiting.FakeClock
    with pytest.raises(AttributeError):
        _ = syncfw.testing.no_such_name


def test_the_kit_imports_without_hypothesis() -> None:
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import syncfw.testing as t\n"
        "assert t.MemoryReplica and t.check_replica and t.wait_until\n"
        "try:\n"
        "    t.chains\n"
        "except ImportError:\n"
        "    print('strategies need hypothesis')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "strategies need hypothesis"
