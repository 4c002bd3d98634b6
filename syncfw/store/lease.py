"""The head lease: a lower bound on this node's own chain, kept beside its database.

A node must never issue a seq its peers may already hold: the second op at that seq
is a fork of its own chain, and every exchange with those peers would end in it.
That happens when a file loses commits it once had — a lost WAL, or a restore from an
older backup of the ``.db`` — so the store keeps, *outside* the file, how far its own
chain is known to have reached.

Invariants:

1. ``<db>.head`` holds ``node_id seq`` of this node's own chain at a point that was
   committed: it is written only after a commit, never before, so it never claims
   more than the file once held.
2. It lags (written at most every :data:`LEASE_EVERY` own ops, and at close), so a
   crash, even a power cut, never leaves it ahead of the file: no false alarms.
3. At open, a lease ahead of the file's own seq proves ops were lost. The store is
   then **fenced**: local writes raise :class:`~syncfw.errors.ChainFencedError` until
   the node has its own chain back up to the lease (any peer that holds it relays it
   back at the next exchange), or an operator accepts the loss
   (``syncfw inspect DB --accept-lost-ops``: only when no peer can hold those ops).
4. A lease that cannot be read, or names another node, is ignored with a WARNING;
   it is advice about the file, never a reason to refuse to open it.
"""

from __future__ import annotations

import logging
import os

__all__ = ["LEASE_EVERY", "lease_path", "read_lease", "write_lease"]

log = logging.getLogger("syncfw.store")

LEASE_EVERY = 64
"""Own ops between two lease writes (plus one at close)."""


def lease_path(db_path: str) -> str:
    """The head lease file of a database file."""
    return db_path + ".head"


def read_lease(db_path: str, node_id: str) -> int:
    """The seq the lease beside ``db_path`` vouches ``node_id``'s chain reached (0: none)."""
    if db_path == ":memory:" or db_path.startswith("file::memory:"):
        return 0
    path = lease_path(db_path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(512)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log.warning("ignoring the head lease %s: %s", path, exc)
        return 0
    parts = text.split()
    if len(parts) != 2 or not parts[1].isdigit():
        log.warning("ignoring the head lease %s: not 'node seq'", path)
        return 0
    if parts[0] != node_id:
        log.warning("ignoring the head lease %s: it is %r's, not %r's", path, parts[0], node_id)
        return 0
    return int(parts[1])


def write_lease(db_path: str, node_id: str, seq: int) -> None:
    """Record that ``node_id``'s chain reached ``seq`` (committed). Best effort: a
    failure is a WARNING, never a failed write."""
    if db_path == ":memory:" or db_path.startswith("file::memory:"):
        return
    path = lease_path(db_path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{node_id} {seq}\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not write the head lease %s: %s", path, exc)
