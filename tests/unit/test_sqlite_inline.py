"""Which SQLite statements leave the loop's thread (store/sqlite_inline.py, issue 10)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from store.sqlite_inline import BIG_VALUES_BYTES, _off_loop, connect


def test_statements_that_may_wait_or_move_much_go_to_a_thread() -> None:
    for sql in ("BEGIN IMMEDIATE", " begin", "COMMIT", "ROLLBACK TO SAVEPOINT sa_1",
                "PRAGMA wal_checkpoint(PASSIVE)", "VACUUM"):
        assert _off_loop(sql, ()), sql
    big = b"x" * (BIG_VALUES_BYTES + 1)
    assert _off_loop("INSERT INTO raws VALUES (?, ?)", ("a", big))
    assert _off_loop("INSERT INTO t VALUES (:a, :b)", {"a": "y" * 40_000, "b": "z" * 40_000})


def test_small_statements_run_on_the_calling_thread() -> None:
    assert not _off_loop("SELECT id FROM messages WHERE fingerprint = ?", ("f" * 64,))
    assert not _off_loop("SAVEPOINT sa_1", None)
    assert not _off_loop("INSERT INTO events VALUES (?, ?)", (1, b"x" * 1000))


def test_a_connection_runs_small_statements_inline_and_commits_in_a_thread(
        tmp_path: Path) -> None:
    async def run() -> tuple[list[tuple[int]], bool]:
        connection = await connect(str(tmp_path / "i.sqlite3"))()
        connection._conn.isolation_level = None  # noqa: SLF001 — as store/engine.py sets it
        loop_thread = threading.get_ident()
        seen: list[int] = []
        connection._conn.set_trace_callback(lambda _: seen.append(threading.get_ident()))  # noqa: SLF001
        await connection.execute("CREATE TABLE t (a INTEGER)")
        await connection.execute("BEGIN IMMEDIATE")
        await connection.execute("INSERT INTO t VALUES (?)", (1,))
        await connection.commit()
        rows = await (await connection.execute("SELECT a FROM t")).fetchall()
        await connection.close()
        # CREATE, INSERT and SELECT on this thread; BEGIN and COMMIT elsewhere
        return rows, seen.count(loop_thread) == 3 and len(seen) == 5

    rows, placed = asyncio.run(run())
    assert rows == [(1,)] and placed
