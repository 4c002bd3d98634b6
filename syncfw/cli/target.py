"""Where an operator verb acts: a node's file (``DB``) or a running node's admin endpoint (``ADDR``).

Invariants:

1. An argument naming an existing path is a file; else ``host:port`` (or
   ``http://host:port``) is an admin endpoint; anything else is refused
   naming it. A file is never created by these verbs.
2. A file is opened as the node it belongs to (its node id, fleet id,
   authority and zone grants read from it), so what a verb writes is what
   that node would have written. A file a running node holds is refused
   (:class:`DatabaseLockedError`), naming the holder and, when the node wrote
   it beside the file (``<db>.admin``), the address to use instead.
3. Talking to an endpoint that is down or answers something else is one
   clear error (:class:`TargetError`), never a traceback.
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from syncfw.cli.common import check_dial_address
from syncfw.node.admin import from_json, to_json
from syncfw.zones import GRANT_KIND, SYS_PREFIX, Fleet, Grant

__all__ = [
    "AdminClient",
    "Target",
    "TargetError",
    "admin_file",
    "fleet_of_file",
    "parse_target",
    "read_admin_address",
]


class TargetError(Exception):
    """A target that cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class Target:
    """A file (``db`` set) or an endpoint (``address`` set)."""

    db: str | None = None
    address: str | None = None


def parse_target(text: str) -> Target:
    """Invariant 1."""
    if os.path.exists(text):
        if os.path.isdir(text):
            raise TargetError(f"{text!r} is a directory, not a syncfw database")
        return Target(db=text)
    address = text.removeprefix("http://").rstrip("/")
    if check_dial_address(address) is None:
        return Target(address=address)
    raise TargetError(f"{text!r} is neither an existing node file nor an admin address host:port")


def admin_file(db: str) -> str:
    """The file beside ``db`` where its running node writes its admin address."""
    return db + ".admin"


def read_admin_address(db: str) -> str | None:
    """The admin address a running node wrote beside ``db``, if any."""
    try:
        text = Path(admin_file(db)).read_text().strip()
    except OSError:
        return None
    return text if check_dial_address(text) is None else None


def fleet_of_file(db: str) -> tuple[str, Fleet]:
    """The node id and fleet bootstrap a store file belongs to, read without the lock.

    The bootstrap grants are those in the file's grant table that no grant op
    in its log made (a grant made by an op that was since compacted counts as
    bootstrap; the zone table it gives a local write is the same either way).

    Raises:
        TargetError: the file is not a syncfw store or cannot be read.
    """
    uri = "file:" + Path(db).resolve().as_posix() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise TargetError(f"cannot open {db!r}: {exc}") from None
    try:
        meta = dict(conn.execute("SELECT k, v FROM meta").fetchall())
        rows = conn.execute("SELECT prefix, epoch, owners FROM grants").fetchall()
        granted = {
            (g.get("prefix"), g.get("epoch"))
            for (value,) in conn.execute(
                "SELECT value FROM ops WHERE kind = ?", (GRANT_KIND,)
            ).fetchall()
            for g in [_unpack(value)]
            if isinstance(g, dict)
        }
    except sqlite3.Error as exc:
        raise TargetError(f"{db!r} is not a readable syncfw store: {exc}") from None
    finally:
        conn.close()
    node_id, fleet_id = meta.get("node_id"), meta.get("fleet_id")
    if not isinstance(node_id, str) or not isinstance(fleet_id, str):
        raise TargetError(f"{db!r} does not say which node it belongs to")
    grants = tuple(
        Grant(p, frozenset(msgpack.unpackb(o)), e)
        for p, e, o in sorted(rows)
        if not p.startswith(SYS_PREFIX) and e > 0 and (p, e) not in granted
    )
    return node_id, Fleet(
        fleet_id=fleet_id, authority=str(meta.get("authority", "cloud")), grants=grants
    )


def _unpack(value: bytes) -> Any:
    try:
        return msgpack.unpackb(value)
    except (ValueError, msgpack.UnpackException):
        return None


class AdminClient:
    """A client of a node's admin endpoint (:class:`syncfw.node.admin.AdminServer`)."""

    def __init__(self, address: str, *, timeout_s: float = 10.0) -> None:
        self.address = address
        self.timeout_s = timeout_s

    def call(
        self, method: str, path: str, query: dict[str, Any] | None = None, body: Any = None
    ) -> dict[str, Any]:
        """One request; returns the answer object.

        Raises:
            TargetError: the endpoint cannot be reached, or answered an error
                (its message is in the text).
        """
        url = f"http://{self.address}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None if body is None else json.dumps(to_json(body)).encode()
        req = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            answer = _decode(raw, self.address)
            raise TargetError(
                f"{answer.get('error', exc.code)}: {answer.get('message', '')}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TargetError(f"cannot reach the admin endpoint {self.address}: {reason}") from None
        return _decode(raw, self.address)


def _decode(raw: bytes, address: str) -> dict[str, Any]:
    try:
        answer = from_json(json.loads(raw))
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise TargetError(f"{address} did not answer like a syncfw admin endpoint")
    return answer
