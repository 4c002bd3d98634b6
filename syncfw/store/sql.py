"""The seam between the store and SQLite: statements, transactions, errors, migration.

Every ``sqlite3`` exception the store can meet is translated here
(:func:`translate_error`), so none reaches a user; a write transaction runs as
one list of steps in one hop to aiosqlite's database thread (:func:`run_steps`).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import aiosqlite
import msgpack

from syncfw.errors import (
    CorruptDatabaseError,
    ForeignDatabaseError,
    SchemaVersionError,
    StorageError,
    StorageFullError,
)
from syncfw.store.schema import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION
from syncfw.zones import Fleet, ZoneTable

T = TypeVar("T")

CHUNK = 500  # host parameters per IN (...) query, well under SQLite's limit

Step = tuple[str, Sequence[Sequence[Any]]]
"""One statement and its parameter rows (executemany)."""

INSERT_OP = (
    "INSERT INTO ops (origin, seq, hlc, zone, epoch, key, kind, value, prev, sig, status) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# The LWW rule of syncfw.crdt.lww, as one guarded upsert: the write with the
# greatest (hlc, origin, payload) wins, whatever order writes arrive in.
UPSERT_LWW = (
    "INSERT INTO state (kind, key, hlc, origin, data) VALUES ('lww', ?, ?, ?, ?) "
    "ON CONFLICT (kind, key) DO UPDATE SET hlc = excluded.hlc, origin = excluded.origin, "
    "data = excluded.data "
    "WHERE (excluded.hlc, excluded.origin, excluded.data) > (state.hlc, state.origin, state.data)"
)
# Non-lww rows: ``hlc`` is the newest op applied to the key (telemetry retention reads it).
UPSERT_STATE = (
    "INSERT INTO state (kind, key, hlc, origin, data) VALUES (?, ?, ?, '', ?) "
    "ON CONFLICT (kind, key) DO UPDATE SET data = excluded.data, "
    "hlc = max(state.hlc, excluded.hlc)"
)
UPSERT_HEAD = (
    "INSERT INTO heads (origin, seq, hash) VALUES (?, ?, ?) "
    "ON CONFLICT (origin) DO UPDATE SET seq = excluded.seq, hash = excluded.hash"
)



class StaleTip(Exception):
    """A pipelined batch found the log not ending where it was planned to start, or
    a transaction it was planned on top of failed (:class:`TxnGuard`)."""


class TxnGuard:
    """Ties pipelined transactions together: once one of them fails, every later one
    holding the same guard raises :class:`StaleTip` before writing anything, since
    each was planned on the assumption that the ones before it commit.

    Set and read only on the database thread, in the order the transactions run.
    """

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed = False

    def check(self) -> None:
        """Raise :class:`StaleTip` if a transaction before this one failed."""
        if self.failed:
            raise StaleTip("a transaction this one was planned on top of failed")


TIP_SQL = "SELECT seq FROM heads WHERE origin = ?"


def run_steps(
    db: sqlite3.Connection,
    steps: Sequence[Step],
    expect: tuple[str, int] | None = None,
    measure: bool = False,
    guard: TxnGuard | None = None,
) -> tuple[int, int | None]:
    """Run on the database thread: one transaction, all or nothing.

    Returns the rows changed and, with ``measure``, the file size after
    COMMIT (page count times page size, read in the same hop).
    """
    if guard is not None:
        guard.check()
    changed = 0
    db.execute("BEGIN IMMEDIATE")
    try:
        if expect is not None:
            row = db.execute(TIP_SQL, (expect[0],)).fetchone()
            if (row[0] if row else 0) != expect[1]:
                raise StaleTip(expect)
        for sql, params in steps:
            changed += max(db.executemany(sql, params).rowcount, 0)
        db.execute("COMMIT")
    except BaseException:
        if guard is not None:
            guard.failed = True
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    size = None
    if measure:
        size = db.execute("PRAGMA page_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
    return changed, size


async def transaction(
    conn: aiosqlite.Connection,
    steps: Sequence[Step],
    *,
    expect: tuple[str, int] | None = None,
    measure: bool = False,
    guard: TxnGuard | None = None,
) -> tuple[int, int | None]:
    """Run ``steps`` in one transaction, in one hop to the database thread.

    aiosqlite costs one thread round trip per awaited call (~50-100 us); a
    commit of a batch would otherwise pay for BEGIN, each statement and
    COMMIT. With ``expect=(origin, seq)`` the transaction first checks that
    the log of ``origin`` ends at ``seq`` and raises :class:`StaleTip`
    (writing nothing) if it does not. Returns as :func:`run_steps`.

    Raises:
        StorageError: translated from sqlite3 (StorageFullError on a full
            disk or size cap); the transaction was rolled back whole.
    """
    steps = [s for s in steps if s[1]]
    try:
        run = getattr(conn, "_execute", None)
        if run is not None:
            changed, size = await run(run_steps, conn._conn, steps, expect, measure, guard)
            return int(changed), size
        return await _transaction_stepwise(conn, steps, expect, guard)  # pragma: no cover
    except sqlite3.Error as exc:
        raise translate_error(exc) from None
    except OverflowError as exc:  # the planner keeps every int in range; never leak it
        raise StorageError(f"a value does not fit SQLite's 64-bit INTEGER: {exc}") from None


async def _transaction_stepwise(
    conn: aiosqlite.Connection,
    steps: Sequence[Step],
    expect: tuple[str, int] | None,
    guard: TxnGuard | None,
) -> tuple[int, int | None]:  # pragma: no cover
    """The same through public aiosqlite calls, should its internals change."""
    if guard is not None:
        guard.check()
    changed = 0
    await conn.execute("BEGIN IMMEDIATE")
    try:
        if expect is not None:
            rows = list(await conn.execute_fetchall(TIP_SQL, (expect[0],)))
            if (rows[0][0] if rows else 0) != expect[1]:
                raise StaleTip(expect)
        for sql, params in steps:
            cur = await conn.executemany(sql, params)
            changed += max(cur.rowcount, 0)
        await conn.execute("COMMIT")
    except BaseException:
        if guard is not None:
            guard.failed = True
        with contextlib.suppress(sqlite3.Error):
            await conn.execute("ROLLBACK")
        raise
    return changed, None


# SQLite result codes -> (the syncfw error, what it means). Keyed by the primary
# code's name: an extended code (SQLITE_IOERR_SHORT_READ) is looked up by its
# first two parts (SQLITE_IOERR).
_BY_CODE: dict[str, tuple[type[StorageError], str]] = {
    "SQLITE_FULL": (StorageFullError, "storage is full (disk or size cap); the batch was rolled back"),
    "SQLITE_CORRUPT": (CorruptDatabaseError, "the database file is damaged"),
    "SQLITE_NOTADB": (CorruptDatabaseError, "the file is not a SQLite database"),
    "SQLITE_IOERR": (StorageError, "an I/O error on the database file"),
    "SQLITE_READONLY": (StorageError, "the database file is read-only"),
    "SQLITE_BUSY": (StorageError, "the database file is locked by another connection"),
    "SQLITE_LOCKED": (StorageError, "a table is locked by another statement"),
    "SQLITE_CANTOPEN": (StorageError, "the database file cannot be opened"),
    "SQLITE_PERM": (StorageError, "access to the database file was denied"),
    "SQLITE_NOMEM": (StorageError, "SQLite ran out of memory"),
    "SQLITE_TOOBIG": (StorageError, "a value is larger than SQLite allows"),
    "SQLITE_NOLFS": (StorageError, "the file system cannot hold a file this large"),
    "SQLITE_PROTOCOL": (StorageError, "the database file's locking protocol failed"),
}


def primary_code(name: str) -> str:
    """``SQLITE_IOERR_SHORT_READ`` -> ``SQLITE_IOERR``."""
    return "_".join(name.split("_")[:2])


def translate_error(exc: sqlite3.Error) -> StorageError:
    """Map a sqlite3 error to the syncfw error users see, by its result code's name."""
    name = getattr(exc, "sqlite_errorname", None)
    if name:
        cls, meaning = _BY_CODE.get(primary_code(name), (StorageError, "SQLite error"))
        return cls(f"{meaning} ({name}: {exc})")
    # No result code (an error of the sqlite3 module itself, or an old Python).
    text = str(exc).lower()
    if "full" in text:
        return StorageFullError(f"storage is full ({exc}); the batch was rolled back")
    if "malformed" in text or "not a database" in text or "corrupt" in text:
        return CorruptDatabaseError(f"the database file is damaged: {exc}")
    return StorageError(f"SQLite error: {exc}")


def chunks(items: Sequence[T], n: int = CHUNK) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


async def check_and_migrate(
    conn: aiosqlite.Connection,
    path: str,
    node_id: str,
    fleet: Fleet,
    synchronous: str,
    max_bytes: int | None,
) -> None:
    """Refuse foreign, newer or damaged files before writing; then migrate and configure."""
    try:
        app_id = (await conn.execute_fetchall("PRAGMA application_id"))[0][0]  # type: ignore[index]
        version = (await conn.execute_fetchall("PRAGMA user_version"))[0][0]  # type: ignore[index]
        tables = list(await conn.execute_fetchall("SELECT name FROM sqlite_master"))
    except sqlite3.DatabaseError as exc:
        raise CorruptDatabaseError(f"{path!r} is not a readable SQLite database: {exc}") from None
    if app_id != APPLICATION_ID and (app_id != 0 or tables):
        raise ForeignDatabaseError(f"{path!r} is a SQLite database, but not a syncfw store")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path!r} has schema version {version}; this syncfw knows up to {SCHEMA_VERSION}"
        )
    try:
        if version:
            meta: dict[str, Any] = dict(await conn.execute_fetchall("SELECT k, v FROM meta"))  # type: ignore[arg-type]
            if meta.get("node_id") != node_id:
                raise ForeignDatabaseError(
                    f"{path!r} belongs to node {meta.get('node_id')!r}, not {node_id!r}"
                )
            if meta.get("fleet_id") != fleet.fleet_id:
                raise ForeignDatabaseError(
                    f"{path!r} belongs to fleet {meta.get('fleet_id')!r}, not {fleet.fleet_id!r}"
                )
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute(f"PRAGMA synchronous = {synchronous}")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            await conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[step].split(";"):
                    if statement.strip():
                        await conn.execute(statement)
                if step == 1:
                    await conn.executemany(
                        "INSERT INTO meta (k, v) VALUES (?, ?)",
                        [("node_id", node_id), ("fleet_id", fleet.fleet_id)],
                    )
                    await conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                await conn.execute(f"PRAGMA user_version = {step}")
                await conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
                raise
        # The bootstrap grants are recorded so the file tells its whole zone
        # history (``syncfw inspect``); they are identical on every node.
        await conn.execute("BEGIN IMMEDIATE")
        await conn.executemany(
            "INSERT OR IGNORE INTO grants (prefix, epoch, owners) VALUES (?, ?, ?)",
            [(g.prefix, g.epoch, msgpack.packb(sorted(g.owners))) for g in ZoneTable(fleet).grants()],
        )
        await conn.execute(
            "INSERT OR REPLACE INTO meta (k, v) VALUES ('authority', ?)", (fleet.authority,)
        )
        await conn.execute("COMMIT")
        if max_bytes is not None:
            page_size = (await conn.execute_fetchall("PRAGMA page_size"))[0][0]  # type: ignore[index]
            await conn.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page_size)}")
    except sqlite3.DatabaseError as exc:
        raise translate_error(exc) from None


QUICK_CHECK_ROWS = 20  # findings reported at most


def run_quick_check(db: sqlite3.Connection, seconds: float | None) -> list[str] | None:
    """Run ``PRAGMA quick_check`` on the database thread, stopped after ``seconds``.

    Returns the findings (empty: the file is sound), or None if it ran out of
    time. quick_check reads every page (O(file size); roughly 1 s per GB on an
    SSD) but, unlike integrity_check, does not cross-check indexes.
    """
    if seconds is not None:
        deadline = time.monotonic() + seconds
        db.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    try:
        rows = db.execute(f"PRAGMA quick_check({QUICK_CHECK_ROWS})").fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" in str(exc).lower():
            return None
        raise
    finally:
        db.set_progress_handler(None, 0)
    found = [str(r[0]) for r in rows]
    return [] if found == ["ok"] else found


async def quick_check(conn: aiosqlite.Connection, seconds: float | None) -> list[str] | None:
    """:func:`run_quick_check` in one hop to aiosqlite's database thread.

    Raises:
        CorruptDatabaseError: SQLite could not even read the file to check it.
    """
    try:
        run = getattr(conn, "_execute", None)
        if run is not None:
            result: list[str] | None = await run(run_quick_check, conn._conn, seconds)
            return result
        rows = await conn.execute_fetchall(f"PRAGMA quick_check({QUICK_CHECK_ROWS})")  # pragma: no cover
        found = [str(r[0]) for r in rows]  # pragma: no cover
        return [] if found == ["ok"] else found  # pragma: no cover
    except sqlite3.DatabaseError as exc:
        err = translate_error(exc)
        raise CorruptDatabaseError(f"quick_check could not read the file: {err}") from None
