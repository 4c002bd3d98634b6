"""The public testing kit: what applications and syncfw's own tests build on.

Owns the in-memory replica, the replica contract, op builders, test clocks
and waiting, the deterministic simulator, the transport check and the
hypothesis strategies, as one flat surface (``from syncfw.testing import ...``):

- replicas: :class:`MemoryReplica` (the in-memory :class:`~syncfw.log.Replica`),
  :func:`check_replica` (the acceptance suite every replica passes, the memory
  one and the SQLite ``Node`` alike);
- ops: :class:`OpWriter` and :func:`chain` build valid hash-chained ops;
- time: :class:`FakeClock` (a wall clock moved by hand) and :func:`wait_until`
  (wait for a condition, never a fixed sleep);
- the deterministic simulator: :class:`Simulation`, :class:`SimConfig`,
  :class:`SimReport`, the node kinds :class:`SimNode`, :class:`MemorySimNode`,
  :class:`SqliteSimNode`, and :func:`check`, its checker;
- transports: :func:`check_transport`, the conformance suite;
- trust: :class:`SignedFleet`, a signed fleet's authority and node keys in memory;
- hypothesis strategies: :data:`values`, :func:`chains`, :func:`op_tuples` for
  the log; :func:`histories`, :func:`ydoc_histories` and :class:`History` for
  CRDT laws (more in :mod:`syncfw.testing.strategies`). ``hypothesis`` is a
  dev dependency: they are imported on first use, so ``import syncfw.testing``
  never needs it.

The simulator, the SQLite sim node, the transport check and the strategies
load on first access, so importing the kit stays cheap and needs nothing
beyond syncfw's base install.

May import every layer of syncfw (it is the outermost but the CLI); never grpc
directly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from syncfw.testing.memory import MemoryReplica
from syncfw.testing.ops import OpWriter, chain
from syncfw.testing.replica_check import (
    REPLICA_CHECKS,
    CheckedReplica,
    ReplicaFactory,
    check_replica,
)
from syncfw.testing.waiting import FakeClock, wait_until

if TYPE_CHECKING:
    from syncfw.testing.conformance import check_transport
    from syncfw.testing.sim import (
        MemorySimNode,
        SimConfig,
        SimNode,
        SimReport,
        Simulation,
        check,
    )
    from syncfw.testing.strategies import (
        History,
        chains,
        histories,
        op_tuples,
        values,
        ydoc_histories,
    )
    from syncfw.testing.trust import SignedFleet

__all__ = [
    "REPLICA_CHECKS",
    "CheckedReplica",
    "FakeClock",
    "History",
    "MemoryReplica",
    "MemorySimNode",
    "OpWriter",
    "ReplicaFactory",
    "SimConfig",
    "SimNode",
    "SignedFleet",
    "SimReport",
    "Simulation",
    "SqliteSimNode",
    "chain",
    "chains",
    "check",
    "check_replica",
    "check_transport",
    "histories",
    "op_tuples",
    "values",
    "wait_until",
    "ydoc_histories",
]

_LAZY = {
    "Simulation": "syncfw.testing.sim",
    "SimConfig": "syncfw.testing.sim",
    "SimReport": "syncfw.testing.sim",
    "SimNode": "syncfw.testing.sim",
    "MemorySimNode": "syncfw.testing.sim",
    "check": "syncfw.testing.sim",
    "SqliteSimNode": "syncfw.testing.sqlite_node",
    "SignedFleet": "syncfw.testing.trust",
    "check_transport": "syncfw.testing.conformance",
    "chains": "syncfw.testing.strategies",
    "op_tuples": "syncfw.testing.strategies",
    "values": "syncfw.testing.strategies",
    "History": "syncfw.testing.strategies",
    "histories": "syncfw.testing.strategies",
    "ydoc_histories": "syncfw.testing.strategies",
}


def __getattr__(name: str) -> Any:
    """Load the heavier parts of the kit on first access (see the module docstring)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'syncfw.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
