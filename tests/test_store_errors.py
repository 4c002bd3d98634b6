"""SQLite errors are translated by their result code's name, in one table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import syncfw
from syncfw import Fleet, Grant, Node, StoreConfig
from syncfw.store.sql import primary_code, translate_error

FLEET = Fleet(fleet_id="errors", grants=(Grant.of("site/", "*"),))


def raised(fn: object) -> sqlite3.Error:
    try:
        fn()  # type: ignore[operator]
    except sqlite3.Error as exc:
        return exc
    raise AssertionError("no sqlite3 error")


def test_primary_code_of_extended_codes() -> None:
    assert primary_code("SQLITE_IOERR_SHORT_READ") == "SQLITE_IOERR"
    assert primary_code("SQLITE_CORRUPT") == "SQLITE_CORRUPT"
    assert primary_code("SQLITE_READONLY_DBMOVED") == "SQLITE_READONLY"


def test_a_full_size_cap_is_storage_full(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "cap.db")
    conn.execute("CREATE TABLE t (b BLOB)")
    conn.execute("PRAGMA max_page_count = 4")
    exc = raised(lambda: [conn.execute("INSERT INTO t VALUES (?)", (b"x" * 4000,)) for _ in range(50)])
    assert exc.sqlite_errorname == "SQLITE_FULL"
    err = translate_error(exc)
    assert type(err) is syncfw.StorageFullError and "SQLITE_FULL" in str(err)


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"definitely not SQLite " * 300)
    exc = raised(lambda: sqlite3.connect(path).execute("SELECT * FROM sqlite_master").fetchall())
    assert exc.sqlite_errorname == "SQLITE_NOTADB"
    assert type(translate_error(exc)) is syncfw.CorruptDatabaseError


async def test_a_corrupted_page_is_a_corrupt_database(tmp_path: Path) -> None:
    path = tmp_path / "n.db"
    async with Node.open(path, node_id="t7", fleet=FLEET) as node:
        for i in range(200):
            await node.put(f"site/k{i}", "x" * 300)
    data = bytearray(path.read_bytes())
    for off in range(4096 * 2, len(data), 4096):  # every page past the schema
        data[off : off + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    exc = raised(lambda: sqlite3.connect(path).execute("SELECT count(*), max(data) FROM state").fetchall())
    assert primary_code(exc.sqlite_errorname) == "SQLITE_CORRUPT"
    with pytest.raises(syncfw.CorruptDatabaseError, match="SQLITE_CORRUPT"):
        async with Node.open(path, node_id="t7", fleet=FLEET) as node:
            await node.scan("site/")


def test_read_only_and_busy_are_storage_errors_that_say_so(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    err = translate_error(raised(lambda: ro.execute("INSERT INTO t VALUES (1)")))
    assert type(err) is syncfw.StorageError and "read-only" in str(err)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    err = translate_error(raised(lambda: other.execute("BEGIN IMMEDIATE")))
    assert type(err) is syncfw.StorageError and "locked" in str(err) and "SQLITE_BUSY" in str(err)
    holder.execute("ROLLBACK")


def test_an_error_without_a_code_name_falls_back_to_its_text() -> None:
    assert type(translate_error(sqlite3.ProgrammingError("cannot operate"))) is syncfw.StorageError
    assert type(translate_error(sqlite3.OperationalError("database or disk is full"))) is (
        syncfw.StorageFullError
    )


async def test_store_size_cap_is_storage_full_through_the_node(tmp_path: Path) -> None:
    cfg = StoreConfig(max_bytes=64 * 1024)
    async with Node.open(tmp_path / "cap.db", node_id="t7", fleet=FLEET, config=cfg) as node:

        async def fill() -> None:
            for i in range(10_000):
                await node.put(f"site/k{i}", "y" * 500)

        with pytest.raises(syncfw.StorageFullError, match="SQLITE_FULL"):
            await fill()
        assert await node.get("site/k0") == "y" * 500
