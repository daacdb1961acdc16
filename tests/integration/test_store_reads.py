"""Readers never wait for the SQLite writer (WAL), so /healthz and /metrics stay quick
while mail is being committed."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from store.engine import Store
from store.models import Ticket


async def test_a_reader_is_not_blocked_by_an_open_write_transaction(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    try:
        async with store.transaction() as writer:
            await writer.execute(select(func.count()).select_from(Ticket))  # holds the lock
            async with store.read() as reader:
                count = await asyncio.wait_for(
                    reader.scalar(select(func.count()).select_from(Ticket)), 2)
        assert count == 0
    finally:
        await store.dispose()
