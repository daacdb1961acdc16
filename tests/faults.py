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


@asynccontextmanager
async def commit_fails(store: Store) -> AsyncIterator[None]:
    """Every statement succeeds but COMMIT fails (a deferred constraint, checked at commit)
    while the block runs: a whole group-commit batch must answer 451 and keep nothing."""
    deferred = "REFERENCES tickets(id) DEFERRABLE INITIALLY DEFERRED"
    async with store.transaction() as session:
        await session.execute(text(f"CREATE TABLE fail_commit (ticket_id INTEGER {deferred})"))
        if store.is_sqlite:
            await session.execute(text("CREATE TRIGGER fail_commit AFTER INSERT ON messages "
                                       "BEGIN INSERT INTO fail_commit VALUES (-1); END"))
        else:
            await session.execute(text(
                "CREATE FUNCTION fail_commit() RETURNS trigger AS $$ BEGIN "
                "INSERT INTO fail_commit VALUES (-1); RETURN NEW; END $$ LANGUAGE plpgsql"))
            await session.execute(text("CREATE TRIGGER fail_commit AFTER INSERT ON messages "
                                       "FOR EACH ROW EXECUTE FUNCTION fail_commit()"))
    try:
        yield
    finally:
        async with store.transaction() as session:
            await session.execute(text("DROP TRIGGER fail_commit" +
                                       ("" if store.is_sqlite else " ON messages")))
            if not store.is_sqlite:
                await session.execute(text("DROP FUNCTION fail_commit()"))
            await session.execute(text("DROP TABLE fail_commit"))


@asynccontextmanager
async def mail_fails(store: Store, subject: str) -> AsyncIterator[None]:
    """Inserting a message with this subject fails (only that mail) while the block runs."""
    async with store.transaction() as session:
        if store.is_sqlite:
            await session.execute(text(
                "CREATE TRIGGER fail_subject BEFORE INSERT ON messages WHEN NEW.subject = "
                f"'{subject}' BEGIN SELECT RAISE(ABORT, 'injected failure'); END"))
        else:
            await session.execute(text(
                "CREATE FUNCTION fail_subject() RETURNS trigger AS $$ BEGIN IF NEW.subject = "
                f"'{subject}' THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; "
                "END $$ LANGUAGE plpgsql"))
            await session.execute(text("CREATE TRIGGER fail_subject BEFORE INSERT ON messages "
                                       "FOR EACH ROW EXECUTE FUNCTION fail_subject()"))
    try:
        yield
    finally:
        async with store.transaction() as session:
            await session.execute(text("DROP TRIGGER fail_subject" +
                                       ("" if store.is_sqlite else " ON messages")))
            if not store.is_sqlite:
                await session.execute(text("DROP FUNCTION fail_subject()"))
