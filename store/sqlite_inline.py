"""SQLite for SQLAlchemy's async engine without a thread hop per statement (issue 10).

aiosqlite runs every call on a thread of its own: each statement is a queue put, a thread
wake-up, a trip back through the event loop's self-pipe and two GIL hand-overs. A mail takes
~15 statements, each a few microseconds of SQLite work on an indexed table, and the hops
cost more than the work: a profile under load had the loop waiting in aiosqlite's queue put
for 22% of its time. Here a statement runs on the calling thread, inside the coroutine that
SQLAlchemy awaits, except what can wait or take long, which still goes to a thread:
BEGIN (it may wait for another process's write lock), COMMIT and ROLLBACK (the fsync),
checkpoints, and statements carrying more than 64 KiB of values (a big mail's blobs).

It offers the part of aiosqlite's interface that SQLAlchemy's aiosqlite dialect and
Store.checkpoint use (`create_async_engine(..., async_creator=connect(path))`).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

BIG_VALUES_BYTES = 64 * 1024
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
    if not parameters:
        return False
    values = parameters.values() if isinstance(parameters, dict) else parameters
    size = 0
    for value in values:
        if isinstance(value, (bytes, bytearray, memoryview, str)):
            size += len(value)
            if size > BIG_VALUES_BYTES:
                return True
    return False


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


class Cursor:
    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()

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
            await asyncio.to_thread(self._cursor.execute, sql, parameters)
        else:
            self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> Cursor:
        rows = list(parameters)
        if any(_off_loop(sql, row) for row in rows):
            await asyncio.to_thread(self._cursor.executemany, sql, rows)
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
        self._cursor.close()

    async def setinputsizes(self, *sizes: Sequence[Any]) -> None:
        return None

    async def nextset(self) -> None:
        return None


class Connection:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = self._connection = connection
        self._tx = _Immediate()

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> Cursor:
        return Cursor(self._conn.cursor())

    async def execute(self, sql: str, parameters: Any = None) -> Cursor:
        return await self.cursor().execute(sql, parameters)

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> Cursor:
        return await self.cursor().executemany(sql, parameters)

    async def commit(self) -> None:
        await asyncio.to_thread(self._conn.commit)

    async def rollback(self) -> None:
        await asyncio.to_thread(self._conn.rollback)

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()


def connect(path: str, timeout_s: float = 30.0) -> Callable[[], Any]:
    """The async_creator for create_async_engine: one SQLite connection per call."""
    async def create() -> Connection:
        # Used from the loop's thread and, for BEGIN/COMMIT and big values, from others:
        # one user at a time (SQLAlchemy's pool), serialized by SQLite's own mutex too.
        connection = await asyncio.to_thread(sqlite3.connect, path, timeout=timeout_s,
                                             check_same_thread=False)
        return Connection(connection)

    return create
