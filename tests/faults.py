"""Faults injected into the real store, for tests that prove what a failure does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text

from store.engine import Store


@asynccontextmanager
async def store_fails(store: Store) -> AsyncIterator[None]:
    """Every insert into messages fails until the block ends: deskgate must answer 451."""
    async with store.transaction() as session:
        if store.is_sqlite:
            await session.execute(text("CREATE TRIGGER fail_messages BEFORE INSERT ON messages "
                                       "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"))
        else:
            await session.execute(text(
                "CREATE FUNCTION fail_messages() RETURNS trigger AS $$ BEGIN "
                "RAISE EXCEPTION 'injected failure'; END $$ LANGUAGE plpgsql"))
            await session.execute(text("CREATE TRIGGER fail_messages BEFORE INSERT ON messages "
                                       "FOR EACH ROW EXECUTE FUNCTION fail_messages()"))
    try:
        yield
    finally:
        async with store.transaction() as session:
            await session.execute(text("DROP TRIGGER fail_messages" +
                                       ("" if store.is_sqlite else " ON messages")))
            if not store.is_sqlite:
                await session.execute(text("DROP FUNCTION fail_messages()"))
