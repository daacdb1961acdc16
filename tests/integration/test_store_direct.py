"""The direct statement path (store/direct.py) writes and returns what SQLAlchemy's own
execution does, on both stores, and keeps the savepoint and error contracts (issue 10)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import bindparam, select, text
from sqlalchemy import exc as sa_exc

from gateway.outbound import queue
from gateway.outbound.notify import _PEOPLE, _TEXT
from store import direct, repo
from store.engine import Store
from store.models import Agent, AgentDepartment, Base, Contact, Department, Message

NOW = datetime(2026, 11, 24, 9, 30, 15, 123456, tzinfo=UTC)
DUMPED = ("departments", "contacts", "agents", "agent_departments", "tickets", "raws", "messages",
          "attachments", "events", "outbox")


async def _scenario(session: Any) -> list[Any]:
    """Every registered statement, the way the ingest transaction and its hooks use them."""
    out: list[Any] = []
    dept = await repo.insert_row(session, Department, {"slug": "support", "name": "Support"})
    contact = await repo.insert_row(session, Contact, {"email": "ann@customer.example",
                                                       "created_at": NOW})
    agent = await repo.insert_row(session, Agent, {"email": "al@example.test", "name": "Al",
                                                   "created_at": NOW})
    await session.execute(AgentDepartment.__table__.insert(), [{"agent_id": agent,
                                                               "department_id": dept}])
    out.append(await repo.upsert_contact(session, "ann@customer.example", "Ann", NOW))
    out.append(await repo.account_for_domain(session, "customer.example"))
    ticket = await repo.insert_ticket(session, {
        "department_id": dept, "contact_id": contact, "subject": "Printer on fire",
        "created_at": NOW, "updated_at": NOW, "tags": ["urgent"], "language": "en"})
    out.append(ticket)
    await repo.put_raw(session, "ab" * 32, b"From: ann\r\n\r\nhello\r\n", NOW)
    await repo.put_raw(session, "ab" * 32, b"From: ann\r\n\r\nhello\r\n", NOW)  # ignored
    message = await repo.insert_row(session, Message, {
        "ticket_id": ticket[0], "direction": "in", "kind": "customer",
        "message_id": "m1@customer.example", "fingerprint": "f" * 64,
        "references": ["r0@customer.example"], "date": NOW - timedelta(minutes=3),
        "received_at": NOW, "text": "hello", "raw_sha256": "ab" * 32})
    out.append(message)
    await repo.add_events(session, ticket[0], NOW, [("created", {"by": "mail"}),
                                                    ("acknowledged", {})])
    await repo.add_attachments(session, [
        {"message_id": message, "filename": "a.txt", "content_type": "text/plain", "size": 2,
         "sha256": "c" * 64, "content": b"hi"},
        {"message_id": message, "filename": None, "content_type": "image/png", "size": 0,
         "sha256": "d" * 64, "content": None}])
    await repo.touch_ticket(session, ticket[0], NOW + timedelta(seconds=5))
    out.append(await repo.find_by_fingerprint(session, "f" * 64))
    out.append(await repo.find_by_fingerprint(session, "0" * 64))
    out.append(await repo.ticket_ref(session, ticket[1]))
    queued = await queue.insert(session, kind="ack", from_addr="support@example.test",
                                to="ann@customer.example", message_id="a1@example.test",
                                mime=b"MIME", now=NOW, verified=False,
                                ticket_id=ticket[0], cause_message_id=message)
    out.append(queued)
    out.append(await queue.recent_and_verified(session, "ack", "ann@customer.example",
                                               NOW - timedelta(hours=1),
                                               "support@example.test"))
    people = (await session.execute(_PEOPLE, {"ticket_id": ticket[0],
                                              "sender": "al@example.test"})).all()
    out.append([tuple(row) for row in people])
    text_row = (await session.execute(_TEXT, {"message_pk": message})).first()
    out.append(tuple(text_row))
    return out


async def _dump(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    tables = {t.name: t for t in Base.metadata.sorted_tables}
    dump = {}
    async with store.read() as session:
        for name in DUMPED:
            table = tables[name]
            rows = await session.execute(select(table).order_by(*table.primary_key.columns))
            dump[name] = [tuple(row) for row in rows]
    return dump


async def _run(url: str, enabled: bool, monkeypatch: pytest.MonkeyPatch
               ) -> tuple[list[Any], dict[str, Any], int]:
    monkeypatch.setattr(direct, "ENABLED", enabled)
    store = Store(url)
    before = direct.executed
    try:
        async with store.transaction() as session, session.begin_nested():
            out = await _scenario(session)
        return out, await _dump(store), direct.executed - before
    finally:
        await store.dispose()


async def test_the_direct_path_writes_and_returns_what_sqlalchemy_does(
        db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    expected, expected_rows, not_direct = await _run(db_url, False, monkeypatch)
    assert not_direct == 0
    # The same scenario again on an emptied store, now through the direct path.
    store = Store(db_url)
    async with store.transaction() as session:
        for name in reversed(DUMPED):
            await session.execute(Base.metadata.tables[name].delete())
        if store.engine.dialect.name == "postgresql":
            for name in DUMPED:
                if name not in ("raws", "agent_departments"):
                    await session.execute(text(f"ALTER SEQUENCE {name}_id_seq RESTART WITH 1"))
            await session.execute(text("ALTER SEQUENCE ticket_number_seq RESTART WITH 1"))
        # SQLite: no AUTOINCREMENT, an emptied table numbers from 1 again
    await store.dispose()
    got, got_rows, went_direct = await _run(db_url, True, monkeypatch)
    assert went_direct >= 15  # every registered statement of the scenario took the path
    assert got == expected
    assert got_rows == expected_rows
    updated_at = Base.metadata.tables["tickets"].columns.keys().index("updated_at")
    assert got_rows["tickets"][0][updated_at] == NOW + timedelta(seconds=5)  # zone and µs kept


async def test_outside_a_savepoint_statements_go_through_sqlalchemy(db_url: str) -> None:
    store = Store(db_url)
    before = direct.executed
    try:
        async with store.transaction() as session:
            assert await repo.find_by_fingerprint(session, "0" * 64) is None
    finally:
        await store.dispose()
    assert direct.executed == before


async def test_a_driver_error_is_sqlalchemys_and_the_savepoint_undoes_direct_writes(
        db_url: str) -> None:
    store = Store(db_url)
    try:
        async with store.transaction() as session:
            async with session.begin_nested():
                await repo.insert_row(session, Contact, {"email": "kept@x.example",
                                                         "created_at": NOW})
            with pytest.raises(sa_exc.IntegrityError):
                async with session.begin_nested():
                    await repo.insert_row(session, Contact, {"email": "gone@x.example",
                                                             "created_at": NOW})
                    await repo.insert_row(session, Contact, {"email": "kept@x.example",
                                                             "created_at": NOW})
            async with session.begin_nested():  # the transaction goes on after the failure
                emails = (await session.execute(select(Contact.email))).scalars().all()
        assert emails == ["kept@x.example"]
    finally:
        await store.dispose()



_CONTACT = direct.direct(select(Contact.__table__.c.email, Contact.__table__.c.id)
                         .where(Contact.__table__.c.email == bindparam("email")))


async def test_results_of_one_statement_share_its_metadata_and_stay_apart(db_url: str) -> None:
    # A plan's result metadata is made once and shared by its results (as SQLAlchemy shares
    # a compiled statement's): results read interleaved, as rows, as mappings, reduced to a
    # column, each give their own rows.
    store = Store(db_url)
    try:
        async with store.transaction() as session:
            async with session.begin_nested():
                ids = [await repo.insert_row(session, Contact, {"email": e, "created_at": NOW})
                       for e in ("a@x.example", "b@x.example")]
                before = direct.executed
                found = [await session.execute(_CONTACT, {"email": e})
                         for e in ("a@x.example", "b@x.example", "b@x.example", "c@x.example")]
                assert direct.executed == before + 4
                assert found[0]._metadata is found[3]._metadata  # noqa: SLF001
                by_column = found[2].scalars(1)
                mapped = found[1].mappings()
                assert found[3].all() == []
                assert by_column.one() == ids[1]
                assert dict(mapped.one()) == {"email": "b@x.example", "id": ids[1]}
                assert [tuple(r) for r in found[0].all()] == [("a@x.example", ids[0])]
    finally:
        await store.dispose()
