"""Which SQLite statements leave the loop's thread (store/sqlite_inline.py, issue 10)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from store import sqlite_inline
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


async def _traced(path: Path) -> tuple[Any, list[tuple[str, bool]]]:
    """A connection as store/engine.py sets it up; each statement with whether it ran on the
    loop's thread."""
    connection = await connect(str(path))()
    connection._conn.isolation_level = None  # noqa: SLF001 — as store/engine.py sets it
    loop_thread = threading.get_ident()
    seen: list[tuple[str, bool]] = []
    connection._conn.set_trace_callback(  # noqa: SLF001
        lambda sql: seen.append((sql, threading.get_ident() == loop_thread)))
    await connection.execute("CREATE TABLE IF NOT EXISTS t (a INTEGER)")
    return connection, seen


def _thread_of(seen: list[tuple[str, bool]], head: str) -> list[bool]:
    return [on_loop for sql, on_loop in seen if sql.upper().startswith(head)]


def test_with_the_write_lock_free_begin_and_a_quick_commit_stay_on_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_inline, "INLINE_COMMIT_S", 60.0)  # whatever this disk's fsync

    async def run() -> tuple[list[tuple[int]], list[tuple[str, bool]]]:
        connection, seen = await _traced(tmp_path / "i.sqlite3")
        for value in (1, 2):
            await connection.execute("BEGIN IMMEDIATE")
            await connection.execute("INSERT INTO t VALUES (?)", (value,))
            await connection.commit()
        rows = await (await connection.execute("SELECT a FROM t")).fetchall()
        await connection.close()
        return rows, seen

    rows, seen = asyncio.run(run())
    assert rows == [(1,), (2,)]
    assert all(on_loop for _, on_loop in seen)
    assert _thread_of(seen, "BEGIN") == [True, True] and len(_thread_of(seen, "COMMIT")) == 2


def test_run_inline_answers_small_statements_and_leaves_the_rest_to_the_cursor(
        tmp_path: Path) -> None:
    """store/direct.py's fast way: rows and rowcount of a small statement, on the loop; None
    (take the awaitable cursor) for what must go to a thread."""
    async def run() -> tuple[list[Any], list[tuple[str, bool]]]:
        connection, seen = await _traced(tmp_path / "r.sqlite3")
        await connection.execute("BEGIN IMMEDIATE")
        out: list[Any] = [connection.run_inline("INSERT INTO t VALUES (?), (?)", (1, 2), False),
                          connection.run_inline("SELECT a FROM t ORDER BY a", (), True),
                          connection.run_inline("UPDATE t SET a = a + ?", (10,), False),
                          connection.run_inline("INSERT INTO t VALUES (?)",
                                                ("x" * (BIG_VALUES_BYTES + 1),), False),
                          connection.run_inline("COMMIT", (), False)]
        await connection.commit()
        await connection.close()
        return out, seen

    out, seen = asyncio.run(run())
    assert out == [([], 2), ([(1,), (2,)], -1), ([], 2), None, None]
    assert all(on_loop for _, on_loop in seen)
    assert not [sql for sql, _ in seen if "xxxx" in sql]  # the big one was not run by it


def test_begin_waits_in_a_thread_while_another_connection_writes(tmp_path: Path) -> None:
    """The CLI (or any other writer) holds the lock: BEGIN must wait, not fail, and the loop
    must go on meanwhile."""
    async def run() -> tuple[list[tuple[str, bool]], int, int]:
        connection, seen = await _traced(tmp_path / "w.sqlite3")
        other = sqlite3.connect(tmp_path / "w.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        begin = asyncio.ensure_future(connection.execute("BEGIN IMMEDIATE"))
        await asyncio.sleep(0.2)
        waited = ticks
        assert not begin.done()
        other.execute("COMMIT")
        await begin
        await connection.execute("INSERT INTO t VALUES (?)", (1,))
        await connection.commit()
        ticker.cancel()
        other.close()
        await connection.close()
        return seen, waited, len(_thread_of(seen, "BEGIN"))

    seen, waited, begins = asyncio.run(run())
    assert waited >= 10  # the loop ran while BEGIN waited for the other writer
    assert _thread_of(seen, "BEGIN") == [True, False]  # tried on the loop, then waited aside
    assert _thread_of(seen, "PRAGMA BUSY_TIMEOUT") == [True, True]  # 0, then back
    assert begins == 2


def test_a_commit_of_big_values_or_after_slow_commits_goes_to_a_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """And so does every commit for a while after a big one: the disk is writing it back,
    and a small commit's fsync stalled the loop 83-162 ms behind that (bench, big mails)."""
    monkeypatch.setattr(sqlite_inline, "INLINE_COMMIT_S", 60.0)

    async def run() -> list[tuple[str, bool]]:
        connection, seen = await _traced(tmp_path / "b.sqlite3")

        async def small(value: int) -> None:
            await connection.execute("BEGIN IMMEDIATE")
            await connection.execute("INSERT INTO t VALUES (?)", (value,))
            await connection.commit()

        async def big(size: int) -> None:
            await connection.execute("BEGIN IMMEDIATE")
            await connection.execute("INSERT INTO t VALUES (?)", (b"x" * size,))
            await connection.commit()

        await small(0)  # nothing big yet: on the loop
        await big(BIG_VALUES_BYTES + 1)  # big values: in a thread
        await small(1)  # a mid-sized mail: the next commit stays on the loop
        await big(sqlite_inline.AFTER_BIG_BYTES)  # a big mail's piece: in a thread
        await small(2)  # right after it: in a thread too
        monkeypatch.setattr(sqlite_inline, "AFTER_BIG_S", 0.0)  # that while has passed
        await small(3)  # small again: on the loop
        monkeypatch.setattr(sqlite_inline, "INLINE_COMMIT_S", 0.0)  # as if the disk were slow
        await small(4)
        await connection.close()
        return seen

    seen = asyncio.run(run())
    assert _thread_of(seen, "COMMIT") == [True, False, True, False, False, True, False]


def test_closing_while_a_thread_still_runs_a_statement_waits_for_it(tmp_path: Path) -> None:
    """The daemon stopping cancels a BEGIN that waits in a thread, and SQLAlchemy closes the
    connection: closing under the running statement would crash the process; the close
    happens when the thread is done instead."""
    async def run() -> tuple[bool, bool]:
        connection, _ = await _traced(tmp_path / "c.sqlite3")
        other = sqlite3.connect(tmp_path / "c.sqlite3", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        begin = asyncio.ensure_future(connection.execute("BEGIN IMMEDIATE"))
        await asyncio.sleep(0.1)
        assert connection.running
        begin.cancel()
        await connection.close()
        open_meanwhile = connection._conn.total_changes >= 0  # noqa: SLF001 — still usable
        other.execute("COMMIT")
        other.close()
        for _ in range(200):  # the thread's BEGIN goes through, then it closes the connection
            if not connection.running:
                break
            await asyncio.sleep(0.01)
        try:
            connection._conn.total_changes  # noqa: B018, SLF001
            closed = False
        except sqlite3.ProgrammingError:
            closed = True
        return open_meanwhile, closed

    open_meanwhile, closed = asyncio.run(run())
    assert open_meanwhile and closed


def test_a_rollback_with_no_transaction_open_is_not_sent_to_a_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool rolls back each connection it gets back, after a COMMIT too; an open
    transaction is still rolled back (in a thread)."""
    monkeypatch.setattr(sqlite_inline, "INLINE_COMMIT_S", 60.0)

    async def run() -> tuple[list[tuple[str, bool]], list[tuple[int]], int]:
        connection, seen = await _traced(tmp_path / "r.sqlite3")
        hops = 0
        real = connection.in_thread

        async def counted(function: Any, *args: Any) -> Any:
            nonlocal hops
            hops += 1
            return await real(function, *args)

        connection.in_thread = counted
        await connection.execute("BEGIN IMMEDIATE")
        await connection.execute("INSERT INTO t VALUES (?)", (1,))
        await connection.commit()
        await connection.rollback()  # after a COMMIT, as the pool does: nothing open
        await connection.execute("BEGIN IMMEDIATE")
        await connection.execute("INSERT INTO t VALUES (?)", (2,))
        await connection.rollback()  # open: undone
        rows = await (await connection.execute("SELECT a FROM t")).fetchall()
        await connection.close()
        return seen, rows, hops

    seen, rows, hops = asyncio.run(run())
    assert rows == [(1,)]
    assert hops == 1 and _thread_of(seen, "ROLLBACK") == [False]
