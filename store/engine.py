"""Engines for both stores: SQLite (WAL, synchronous=FULL, one writer) and PostgreSQL."""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from store import jsontext, sqlite_inline
from store.direct import DirectSession

log = structlog.get_logger("deskgate.store")
READ_ONLY = "deskgate_read_only"
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    # FULL: a commit is on disk before we answer 250 (DESIGN 4), even across power loss.
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
    # Checkpoints run beside the writers (Store.checkpoints): an automatic one runs inside
    # the COMMIT of whichever writer crosses the mark, and a 10 MB mail's commit took 60 ms
    # instead of 18 with it, while every small mail waited (issue 10). This is the safety
    # net should the background checkpoints stall: 10,000 pages, 40 MB of WAL.
    "PRAGMA wal_autocheckpoint=10000",
)
CHECKPOINT_EVERY_S = 1.0
# Statements on the loop's thread (store/sqlite_inline.py); DESKGATE_SQLITE_THREADS=1 puts
# every statement on aiosqlite's thread again, should an operator need to rule it out.
INLINE_SQLITE = os.environ.get("DESKGATE_SQLITE_THREADS") != "1"


def _tune_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so BEGIN IMMEDIATE can be issued:
        # a writer then waits for the lock up front instead of failing to upgrade later.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Any) -> None:
        # Readers take a plain (deferred) BEGIN: in WAL mode they never wait for the writer.
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def make_engine(url: str) -> AsyncEngine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        if INLINE_SQLITE and parsed.database and parsed.database != ":memory:":
            engine = create_async_engine(url, async_creator=sqlite_inline.connect(parsed.database),
                                         json_serializer=jsontext.dumps)
        else:
            engine = create_async_engine(url, connect_args={"timeout": 30},
                                         json_serializer=jsontext.dumps)
        _tune_sqlite(engine)
        return engine
    return create_async_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True,
                               json_serializer=jsontext.dumps)


class WriterQueue:
    """SQLite's one writer, queued in the process: group-commit batches in one lane, every
    other writer (a big mail's own transaction, the relay worker, the scheduler) in the other.
    The lanes take turns when both wait, so a small mail's batch waits behind at most one
    big mail's transaction, not behind all of them (issue 10), and the others never starve.

    Between processes (`serve --workers 2`), a lock file beside the database hands the
    writer role over the moment it is free; SQLite's own busy handler polls with sleeps of up
    to 100 ms, and two workers got 1.07x one. SQLite's locking stays what guarantees
    correctness, for any other writer (the CLI) too."""

    def __init__(self, lock_path: Path | None = None) -> None:
        self._held = False
        self._lanes: tuple[deque[asyncio.Future[None]], ...] = (deque(), deque())
        self._last = 0
        self._lock_path = lock_path
        self._lock_fd: int | None = None
        self._lock_pid = 0

    @asynccontextmanager
    async def hold(self, lane: int) -> AsyncIterator[None]:
        await self._acquire(lane)
        waiter = self._lock_file()
        if waiter is not None:
            try:
                await asyncio.shield(waiter)
            except asyncio.CancelledError:
                # The thread still gets the lock: the lock and the turn go back only then,
                # or the next writer of this process would share it with nobody holding it.
                waiter.add_done_callback(lambda _: (self._unlock_file(), self._release()))
                raise
            except BaseException:
                self._release()
                raise
        try:
            yield
        finally:
            self._unlock_file()
            self._release()

    def _file(self) -> int | None:
        if self._lock_path is None:
            return None
        if self._lock_fd is None or self._lock_pid != os.getpid():
            try:
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:  # a read-only directory: SQLite's busy handler alone, as before
                self._lock_path = None
                return None
            self._lock_pid = os.getpid()
        return self._lock_fd

    def _lock_file(self) -> asyncio.Future[None] | None:
        """None when the lock file is ours (or there is none); else the thread waiting."""
        fd = self._file()
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: no thread hop
            return None
        except BlockingIOError:
            return asyncio.ensure_future(asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX))

    def _unlock_file(self) -> None:
        if self._lock_fd is not None and self._lock_path is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    async def _acquire(self, lane: int) -> None:
        if not self._held and not any(self._lanes):
            self._held, self._last = True, lane
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lanes[lane].append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed to us as we were cancelled
                self._release()
            raise

    def _release(self) -> None:
        for lane in (1 - self._last, self._last):
            waiting = self._lanes[lane]
            while waiting:
                turn = waiting.popleft()
                if not turn.done():  # done: its waiter was cancelled meanwhile
                    self._last = lane
                    turn.set_result(None)
                    return
        self._held = False


def _lock_file_of(url: str) -> Path | None:
    """Beside a database file (not :memory:): where its deskgate processes queue to write."""
    database = make_url(url).database
    return Path(f"{database}-writer.lock") if database and database != ":memory:" else None


class Store:
    """The database handle passed down from the composition root; no module-level engine."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        # DirectSession: the statements every mail runs go past SQLAlchemy's execution layers
        # (store/direct.py); everything else is plain AsyncSession.
        self.sessions = async_sessionmaker(self.engine, class_=DirectSession,
                                           expire_on_commit=False)
        # SQLite has one writer; queueing writers here is cheaper than its busy loop.
        self._writers = WriterQueue(_lock_file_of(url)) if self.is_sqlite else None
        self._checkpoint_due = asyncio.Event()

    @asynccontextmanager
    async def transaction(self, batch: bool = False) -> AsyncIterator[AsyncSession]:
        """One transaction: committed when the block ends, rolled back on any exception.
        batch: a group-commit batch (its own lane in SQLite's writer queue)."""
        async with self._writers.hold(int(batch)) if self._writers else nullcontext():
            async with self.sessions() as session, session.begin():
                yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only snapshot: never queues behind writers, never holds the write lock."""
        async with self.sessions() as session:
            await session.connection(execution_options={READ_ONLY: True})
            yield session

    async def checkpoint(self) -> None:
        """Copy committed WAL frames into the database file without blocking any writer or
        reader (PASSIVE), on a connection of its own, outside any transaction."""
        async with self.engine.connect() as connection:
            driver: Any = (await connection.get_raw_connection()).driver_connection
            cursor = await driver.execute("PRAGMA wal_checkpoint(PASSIVE)")
            await cursor.close()

    def checkpoint_soon(self) -> None:
        """Much was written to the WAL (a piece of a big value: store/blobs.py): copy it out
        now, not at the next tick. A burst of big mails wrote 40 MB within one tick, and the
        commit crossing wal_autocheckpoint then ran the checkpoint itself, holding the write
        lock 50-55 ms while small mails waited."""
        self._checkpoint_due.set()

    async def checkpoints(self, every_s: float = CHECKPOINT_EVERY_S) -> None:
        """SQLite's WAL checkpoints, off the writers' path, until cancelled."""
        while True:
            try:
                # Not asyncio.wait_for: on Python 3.11 it drops a cancellation that comes in
                # the turn the request does (a big mail's piece as the daemon stops), and
                # this task then ran on for ever.
                async with asyncio.timeout(every_s):
                    await self._checkpoint_due.wait()
            except TimeoutError:
                pass
            self._checkpoint_due.clear()
            try:
                await self.checkpoint()
            except Exception as exc:  # noqa: BLE001 — the autocheckpoint mark still holds
                log.warning("store.checkpoint_failed", error=type(exc).__name__)

    async def dispose(self) -> None:
        await self.engine.dispose()


class CommitFailed(Exception):
    """BEGIN or COMMIT of a group-commit batch failed: nothing of the batch was kept.
    The store's own error is the __cause__."""


T = TypeVar("T")
Unit = Callable[[AsyncSession], Awaitable[T]]


@dataclass(slots=True, eq=False)
class _Queued(Generic[T]):
    unit: Unit[T]
    future: asyncio.Future[T]
    attempts: int
    on_conflict: Callable[[int, IntegrityError], None] | None
    attempt: int = 0


class GroupCommit:
    """Units of work from concurrent callers share one transaction and one commit.

    Each unit runs in its own SAVEPOINT inside the batch's transaction, so a unit that fails
    rolls back alone and its neighbours go on; a unit that hits IntegrityError (another
    instance wrote the same row first) is queued again, up to `attempts` times. `run`
    returns only after the COMMIT holding the unit succeeded (DESIGN 4: 250 after commit);
    when BEGIN or COMMIT fails, every caller of that batch gets CommitFailed and nothing
    of the batch is kept. No added wait: while one batch commits, the next one gathers
    (`linger_s` can add a wait), at most `max_batch` units each.
    """

    def __init__(self, store: Store, max_batch: int = 64, linger_s: float = 0.0,
                 writers: int | None = None) -> None:
        self.store = store
        self.max_batch = max_batch
        self.linger_s = linger_s
        # SQLite has one writer anyway; PostgreSQL overlaps one batch's round trips with
        # the next one's statements.
        self.writers = writers or (1 if store.is_sqlite else 2)
        self._queue: list[_Queued[Any]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # committed batches, for tests and metrics
        self.largest = 0  # most units one transaction held (committed or not)

    async def run(self, unit: Unit[T], attempts: int = 3,
                  on_conflict: Callable[[int, IntegrityError], None] | None = None) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(unit, future, attempts, on_conflict))
        self._kick()
        return await future

    def _kick(self) -> None:
        while self._queue and self._running < self.writers:
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        try:
            while self._queue:
                if self.linger_s and len(self._queue) < self.max_batch:
                    await asyncio.sleep(self.linger_s)
                await self._batch()
        finally:
            self._running -= 1
            if self._queue:
                self._kick()

    def _take(self, room: int) -> list[_Queued[Any]]:
        taken = [q for q in self._queue[:room] if not q.future.done()]
        del self._queue[:room]
        return taken

    async def _batch(self) -> None:
        batch = self._take(self.max_batch)
        answers: list[tuple[_Queued[Any], Any]] = []
        again: list[_Queued[Any]] = []
        try:
            async with self.store.transaction(batch=True) as session:
                # Whoever queued while we waited for the write lock joins this commit.
                batch += self._take(self.max_batch - len(batch))
                self.largest = max(self.largest, len(batch))
                for queued in batch:
                    if not queued.future.done():  # done: the caller went away
                        await self._one(session, queued, answers, again)
        except Exception as exc:  # BEGIN or COMMIT failed: the whole batch is rolled back
            for queued in batch:
                if not queued.future.done():
                    failed = CommitFailed(f"{type(exc).__name__} ({len(batch)} in the batch)")
                    failed.__cause__ = exc
                    queued.future.set_exception(failed)
            return
        except BaseException:  # cancelled (loop shutting down): the callers go with us
            for queued in batch:
                queued.future.cancel()
            raise
        self.batches += 1
        for queued, result in answers:
            if not queued.future.done():
                queued.future.set_result(result)
        self._queue[:0] = again

    @staticmethod
    async def _one(session: AsyncSession, queued: _Queued[Any],
                   answers: list[tuple[_Queued[Any], Any]], again: list[_Queued[Any]]) -> None:
        """One unit in its savepoint; its failure is its caller's alone."""
        savepoint = session.unit() if isinstance(session, DirectSession) \
            else session.begin_nested()
        try:
            async with savepoint:
                answers.append((queued, await queued.unit(session)))
        except IntegrityError as exc:
            queued.attempt += 1
            if queued.on_conflict is not None:
                queued.on_conflict(queued.attempt, exc)
            if queued.attempt < queued.attempts:
                again.append(queued)
            else:
                queued.future.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 — delivered to the unit's caller
            queued.future.set_exception(exc)
