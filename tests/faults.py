"""Faults injected into the real store, for tests that prove what a failure does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text

from store.engine import Store


@asynccontextmanager
async def _on_message_insert(store: Store, name: str, timing: str, sqlite: str, plpgsql: str,
                             setup: tuple[str, ...] = (), teardown: tuple[str, ...] = ()
                             ) -> AsyncIterator[None]:
    """A trigger on inserts into messages, on either store, dropped when the block ends.

    `sqlite`: what follows "ON messages" in SQLite (an optional WHEN, then BEGIN … END);
    `plpgsql`: the PostgreSQL trigger function's body.
    """
    async with store.transaction() as session:
        for statement in setup:
            await session.execute(text(statement))
        if store.is_sqlite:
            await session.execute(text(
                f"CREATE TRIGGER {name} {timing} INSERT ON messages {sqlite}"))
        else:
            await session.execute(text(f"CREATE FUNCTION {name}() RETURNS trigger AS $$ BEGIN "
                                       f"{plpgsql} END $$ LANGUAGE plpgsql"))
            await session.execute(text(f"CREATE TRIGGER {name} {timing} INSERT ON messages "
                                       f"FOR EACH ROW EXECUTE FUNCTION {name}()"))
    try:
        yield
    finally:
        async with store.transaction() as session:
            await session.execute(text(f"DROP TRIGGER {name}" +
                                       ("" if store.is_sqlite else " ON messages")))
            if not store.is_sqlite:
                await session.execute(text(f"DROP FUNCTION {name}()"))
            for statement in teardown:
                await session.execute(text(statement))


@asynccontextmanager
async def store_fails(store: Store) -> AsyncIterator[None]:
    """Every insert into messages fails until the block ends: deskgate must answer 451."""
    async with _on_message_insert(
            store, "fail_messages", "BEFORE",
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
            "RAISE EXCEPTION 'injected failure';"):
        yield


@asynccontextmanager
async def commit_fails(store: Store) -> AsyncIterator[None]:
    """Every statement succeeds but COMMIT fails (a deferred constraint, checked at commit)
    while the block runs: a whole group-commit batch must answer 451 and keep nothing."""
    deferred = "REFERENCES tickets(id) DEFERRABLE INITIALLY DEFERRED"
    async with _on_message_insert(
            store, "fail_commit", "AFTER",
            "BEGIN INSERT INTO fail_commit VALUES (-1); END",
            "INSERT INTO fail_commit VALUES (-1); RETURN NEW;",
            setup=(f"CREATE TABLE fail_commit (ticket_id INTEGER {deferred})",),
            teardown=("DROP TABLE fail_commit",)):
        yield


@asynccontextmanager
async def mail_fails(store: Store, subject: str) -> AsyncIterator[None]:
    """Inserting a message with this subject fails (only that mail) while the block runs."""
    async with _on_message_insert(
            store, "fail_subject", "BEFORE",
            f"WHEN NEW.subject = '{subject}' BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
            f"IF NEW.subject = '{subject}' THEN RAISE EXCEPTION 'injected failure'; END IF; "
            "RETURN NEW;"):
        yield
