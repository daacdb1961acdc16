"""SQLite's WAL checkpoints run beside the writers, not inside a writer's COMMIT (issue 10)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import text

from store.engine import Store


async def _store(tmp_path: Path) -> Store:
    store = Store(f"sqlite+aiosqlite:///{tmp_path / 'c.sqlite3'}")
    async with store.transaction() as session:
        await session.execute(text("CREATE TABLE blobs (k TEXT PRIMARY KEY, v BLOB)"))
    return store


def test_a_commit_leaves_its_pages_in_the_wal_until_the_checkpoint(tmp_path: Path) -> None:
    async def run() -> tuple[int, int, int]:
        store = await _store(tmp_path)
        database = tmp_path / "c.sqlite3"
        async with store.transaction() as session:
            await session.execute(text("INSERT INTO blobs VALUES ('a', randomblob(8000000))"))
        before = database.stat().st_size
        await store.checkpoint()
        after = database.stat().st_size
        async with store.read() as session:  # the data reads back from the file it is now in
            size = await session.scalar(text("SELECT length(v) FROM blobs WHERE k = 'a'"))
        await store.dispose()
        return before, after, size

    before, after, size = asyncio.run(run())
    assert before < 1_000_000  # 8 MB committed, below the 40 MB mark: still in the WAL only
    assert after > 8_000_000 and size == 8_000_000


def test_the_background_checkpoints_run_until_cancelled(tmp_path: Path) -> None:
    async def run() -> int:
        store = await _store(tmp_path)
        task = asyncio.create_task(store.checkpoints(every_s=0.05))
        async with store.transaction() as session:
            await session.execute(text("INSERT INTO blobs VALUES ('a', randomblob(3000000))"))
        for _ in range(100):
            if (tmp_path / "c.sqlite3").stat().st_size > 3_000_000:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.dispose()
        return (tmp_path / "c.sqlite3").stat().st_size

    assert asyncio.run(run()) > 3_000_000


def test_a_stop_that_comes_with_a_checkpoint_request_still_stops_them(tmp_path: Path) -> None:
    """The daemon stopping just as a big mail's piece asks for a checkpoint: the request
    wakes the task in the same turn as the cancellation. asyncio.wait_for on Python 3.11
    then returns the wake-up and drops the cancellation, and the task ran on for ever,
    holding up the daemon's stop (seen as a CI time-out)."""
    async def run() -> bool:
        store = await _store(tmp_path)
        task = asyncio.create_task(store.checkpoints(every_s=3600))
        await asyncio.sleep(0)  # waiting for a request now
        store.checkpoint_soon()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=10)
        stopped = bool(done) and task.cancelled()
        if not stopped:
            task.cancel()  # a second cancellation reaches it where the first was dropped
            await asyncio.gather(task, return_exceptions=True)
        await store.dispose()
        return stopped

    assert asyncio.run(run())


def test_writers_of_two_processes_queue_on_the_lock_file(tmp_path: Path) -> None:
    """Two Stores on one file stand for two `serve --workers` processes (flock locks are per
    open file, so they exclude each other within one process too)."""
    async def run() -> list[str]:
        first = await _store(tmp_path)
        second = Store(f"sqlite+aiosqlite:///{tmp_path / 'c.sqlite3'}")
        order: list[str] = []
        inside = asyncio.Event()

        async def hold() -> None:
            async with first.transaction() as session:
                await session.execute(text("INSERT INTO blobs VALUES ('a', x'00')"))
                order.append("first in")
                inside.set()
                await asyncio.sleep(0.3)
                order.append("first out")

        async def wait_turn(name: str) -> None:
            await inside.wait()
            async with second.transaction() as session:
                order.append(f"{name} in")
                await session.execute(text(f"INSERT INTO blobs VALUES ('{name}', x'01')"))

        holder = asyncio.create_task(hold())
        await inside.wait()
        cancelled = asyncio.create_task(wait_turn("cancelled"))
        await asyncio.sleep(0.1)
        cancelled.cancel()  # given up while queued: must not keep the lock afterwards
        await asyncio.gather(cancelled, return_exceptions=True)
        await asyncio.gather(holder, wait_turn("second"))
        assert (tmp_path / "c.sqlite3-writer.lock").exists()
        await first.dispose()
        await second.dispose()
        return order

    assert asyncio.run(run()) == ["first in", "first out", "second in"]
