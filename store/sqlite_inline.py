"""SQLite for SQLAlchemy's async engine without a thread hop per statement (issue 10).

aiosqlite runs every call on a thread of its own: each statement is a queue put, a thread
wake-up, a trip back through the event loop's self-pipe and two GIL hand-overs. A mail takes
~15 statements, each a few microseconds of SQLite work on an indexed table, and the hops
cost more than the work: a profile under load had the loop waiting in aiosqlite's queue put
for 22% of its time. Here a statement runs on the calling thread, inside the coroutine that
SQLAlchemy awaits, except what can wait or take long, which still goes to a thread:
ROLLBACK of an open transaction, checkpoints, statements carrying more than 64 KiB of values
(a big mail's blobs), a BEGIN that would wait for another writer, and a COMMIT that would take
long.

BEGIN IMMEDIATE is tried on the loop without waiting (busy timeout 0): this process's
writers already queue in WriterQueue and other deskgate processes on its lock file, so the
write lock is nearly always free by then; only when it is not (the CLI writing, say) does
BEGIN wait in a thread. COMMIT (the fsync) runs on the loop only while this connection's
recent commits took under INLINE_COMMIT_S and the transaction carried no big values; else in
a thread, so that the loop serves the other sessions during the fsync (which is also when
the next batch gathers). The threshold was 2 ms: on a day this machine's commits took ~1 ms,
committing in a thread instead gave +15 % mails/s side by side (bench/ab.py), with two
worker processes no change. For AFTER_BIG_S after a commit of big values every COMMIT goes
to a thread: the disk is busy writing them, and fsyncs stall.

It offers the part of aiosqlite's interface that SQLAlchemy's aiosqlite dialect and
Store.checkpoint use (`create_async_engine(..., async_creator=connect(path))`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

BIG_VALUES_BYTES = 64 * 1024
INLINE_COMMIT_S = 0.0005  # commits quicker than this (moving average) stay on the loop
# For this long after a commit of big values every COMMIT goes to a thread: the disk is then
# writing those values back (and the checkpoint copying them), and a small COMMIT's fsync
# waited behind that 83-162 ms, on the loop, every session with it (traced in the bench's
# big-mail phase, 20 x 20 MiB). The moving average learns only after such a stall.
AFTER_BIG_S = 2.0
# What counts as big here: a big mail's pieces (store/blobs.py, 1 MiB) and values near that,
# not every mail over 64 KiB (those only take their own COMMIT off the loop).
AFTER_BIG_BYTES = 512 * 1024
# Monotonic time of this process's latest big commit. Per process: with `--workers 2` the
# other worker's big writes do not count here (its commits stall the same disk).
_big_at = float("-inf")
_OFF_LOOP = ("BEGIN", "COMMIT", "END", "ROLLBACK", "PRAGMA WAL_CHECKPOINT", "VACUUM")


_ALWAYS_OFF: dict[str, bool] = {}  # statement text -> is it BEGIN, COMMIT ... (bounded below)


def _off_loop(sql: str, parameters: Any) -> bool:
    always = _ALWAYS_OFF.get(sql)
    if always is None:
        always = sql.lstrip()[:24].upper().startswith(_OFF_LOOP)
        if len(_ALWAYS_OFF) < 4096:
            _ALWAYS_OFF[sql] = always
    if always:
        return True
    return bool(parameters) and _values_bytes(parameters) > BIG_VALUES_BYTES


_SIZED = (bytes, bytearray, memoryview, str)
_EXACT_SIZED = frozenset(_SIZED)
_UNSIZED = frozenset((int, float, bool, type(None)))


def _values_bytes(parameters: Any) -> int:
    """Bytes of text and binary values a statement carries (what its writes move).
    Asked of every statement: the common classes are looked up, isinstance only asked of
    the rest (a generator of isinstance calls took 2.5x as long on a mail's 30 values)."""
    values = parameters.values() if isinstance(parameters, dict) else parameters
    total = 0
    for value in values:
        cls = value.__class__
        if cls in _EXACT_SIZED or cls not in _UNSIZED and isinstance(value, _SIZED):
            total += len(value)
    return total


class _Immediate:
    """aiosqlite's request queue, answered at once: SQLAlchemy's dialect puts calls on it."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except Exception as exc:  # noqa: BLE001 — handed to the awaiting side
            if future is not None:
                future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)


def _is_begin(sql: str) -> bool:
    return sql[:5].upper() == "BEGIN"


class Cursor:
    def __init__(self, cursor: sqlite3.Cursor, owner: Connection) -> None:
        self._cursor = cursor
        self._owner = owner

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Any = None) -> Cursor:
        parameters = () if parameters is None else parameters
        if _off_loop(sql, parameters):
            if _is_begin(sql):
                self._owner.big_values = self._owner.very_big = False
                if self._owner.begin_now(sql):
                    return self
            elif parameters:  # big values: the COMMIT writing them goes to a thread too
                self._owner.big_values = True
                self._owner.very_big = self._owner.very_big or \
                    _values_bytes(parameters) >= AFTER_BIG_BYTES
            await self._owner.in_thread(self._cursor.execute, sql, parameters)
        else:
            self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> Cursor:
        rows = list(parameters)
        if any(_off_loop(sql, row) for row in rows):
            self._owner.big_values = True
            self._owner.very_big = self._owner.very_big or \
                max(map(_values_bytes, rows)) >= AFTER_BIG_BYTES
            await self._owner.in_thread(self._cursor.executemany, sql, rows)
        else:
            self._cursor.executemany(sql, rows)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        if not self._owner.running:  # else a thread still uses it; it goes when unreferenced
            self._cursor.close()

    async def setinputsizes(self, *sizes: Sequence[Any]) -> None:
        return None

    async def nextset(self) -> None:
        return None


class Connection:
    def __init__(self, connection: sqlite3.Connection, timeout_s: float = 30.0) -> None:
        self._conn = self._connection = connection
        self._tx = _Immediate()
        self._timeout_ms = int(timeout_s * 1000)
        self._guard = threading.Lock()  # _running and closing, between the loop and threads
        self._running = 0  # statements of this connection running in threads now
        self._commit_s = 0.0  # moving average of this connection's commits, wherever run
        self.big_values = False  # the open transaction went to a thread: so does its COMMIT
        self.very_big = False  # ... and carried AFTER_BIG_BYTES in one statement

    def run_inline(self, sql: str, parameters: Sequence[Any], fetch: bool
                   ) -> tuple[list[Any], int] | None:
        """store/direct.py's statements: run on the loop, rows and rowcount back, with none of
        the awaitable cursor's steps (~2 µs each, a mail's ten statements); None when the
        statement must take the awaitable way (BEGIN, COMMIT, big values)."""
        if _off_loop(sql, parameters):
            return None
        cursor = self._conn.execute(sql, parameters)
        rows = cursor.fetchall() if fetch else []
        rowcount = cursor.rowcount
        if not self._running:  # as Cursor.close: a thread may be using the connection
            cursor.close()
        return rows, rowcount

    def begin_now(self, sql: str) -> bool:
        """BEGIN on the loop if it need not wait for the write lock; False if it must."""
        conn = self._conn
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.execute(sql)
            return True
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                return False
            raise
        finally:
            conn.execute(f"PRAGMA busy_timeout = {self._timeout_ms}")

    def _timed_commit(self, big: bool, very_big: bool = False) -> None:
        global _big_at
        started = time.perf_counter()
        self._conn.commit()
        if very_big:  # its write-back goes on after the fsync: counted from the end too
            _big_at = time.monotonic()
        if not big:  # the average says how long a small transaction's fsync takes here
            took = time.perf_counter() - started
            self._commit_s = took if not self._commit_s else 0.8 * self._commit_s + 0.2 * took

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> Cursor:
        return Cursor(self._conn.cursor(), self)

    async def execute(self, sql: str, parameters: Any = None) -> Cursor:
        return await self.cursor().execute(sql, parameters)

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> Cursor:
        return await self.cursor().executemany(sql, parameters)

    async def commit(self) -> None:
        global _big_at
        big, self.big_values = self.big_values, False
        very_big, self.very_big = self.very_big, False
        if very_big:  # from now: other connections' commits meet its fsync on the disk
            _big_at = time.monotonic()
        if big or self._commit_s >= INLINE_COMMIT_S or \
                time.monotonic() - _big_at < AFTER_BIG_S:
            await self.in_thread(self._timed_commit, big, very_big)
        else:
            self._timed_commit(big)

    async def rollback(self) -> None:
        self.big_values = self.very_big = False
        if not self._running and not self._conn.in_transaction:
            # SQLAlchemy's pool rolls back every connection it gets back, after each COMMIT
            # too: with no transaction open that is nothing to do, and a thread hop for it
            # kept the write lock (WriterQueue) held until the loop came round to it again.
            return
        await self.in_thread(self._conn.rollback)

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def close(self) -> None:
        self.stop()

    async def in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """function(*args) in a thread. Its caller may be cancelled (the daemon stopping) and
        the connection closed while the thread still runs: the close then waits for the
        thread to finish, as closing under a running statement crashes the process."""
        return await asyncio.to_thread(self._run, function, *args)

    @property
    def running(self) -> bool:
        return bool(self._running)

    def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        with self._guard:
            if self._connection is None:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
            self._running += 1
        try:
            return function(*args)
        finally:
            with self._guard:
                self._running -= 1
                close = self._connection is None and not self._running
            if close:
                self._conn.close()

    def stop(self) -> None:
        with self._guard:
            if self._connection is None:
                return
            self._connection = None
            if self._running:  # the last thread to finish closes it (_run)
                return
        self._conn.close()



def connect(path: str, timeout_s: float = 30.0) -> Callable[[], Any]:
    """The async_creator for create_async_engine: one SQLite connection per call."""
    async def create() -> Connection:
        # Used from the loop's thread and, for BEGIN/COMMIT and big values, from others:
        # one user at a time (SQLAlchemy's pool), serialized by SQLite's own mutex too.
        connection = await asyncio.to_thread(sqlite3.connect, path, timeout=timeout_s,
                                             check_same_thread=False)
        return Connection(connection, timeout_s)

    return create
