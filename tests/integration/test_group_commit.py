"""Group commit (issue 10): concurrent mails share one transaction and one commit; each is
answered only after that commit, a failed commit answers 451 to all of its mails, and one
mail's failure or conflict inside a batch does not fail its neighbours."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import sqlite3
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, func, insert, select
from sqlalchemy.exc import IntegrityError

from gateway.ingest import offload
from gateway.ingest.model import Envelope
from gateway.ingest.offload import BIG_MAIL_BYTES
from gateway.ingest.pipeline import Outcome
from gateway.replies import R250_DUPLICATE
from store import blobs, direct, repo
from store.engine import GroupCommit, Store, WriterQueue
from store.models import Attachment, BlobPart, Contact, Event, Message, Raw, Ticket
from tests.faults import commit_fails, mail_fails
from tests.mailbuild import Reply, make_mail, send

N = 12
GATHER_S = 0.3  # the first batch waits this long, so every mail sent at once joins it
NOW = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)


async def _count(gateway: Any, model: Any, *where: Any) -> int:
    async with gateway.store.read() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)))


async def _send_all(port: int, mails: list[bytes]) -> list[Reply]:
    return list(await asyncio.gather(*(send(port, mail) for mail in mails)))


def _mails(prefix: str, count: int) -> list[bytes]:
    return [make_mail(subject=f"{prefix} {i}", sender=f"C{i} <c{i}@example.org>")
            for i in range(count)]


def _ticket(reply: Reply) -> int | None:
    found = re.search(r"ticket (\d+)", reply.message)
    return int(found[1]) if found else None


async def _gateway(make_gateway: Any) -> Any:
    gw = await make_gateway()
    gw.pipeline.commits.linger_s = GATHER_S
    return gw


async def test_concurrent_mails_share_a_commit_and_are_each_stored_once(
        make_gateway: Any) -> None:
    gw = await _gateway(make_gateway)
    replies = await _send_all(gw.inbound_port, _mails("Question", N))
    assert [(r.code, r.stage) for r in replies] == [(250, "data")] * N
    assert sorted(_ticket(r) or 0 for r in replies) == list(range(1, N + 1))
    commits = gw.pipeline.commits
    assert commits.largest > 1 and commits.batches < N  # they really shared transactions
    assert await _count(gw, Message, Message.direction == "in") == N
    assert await _count(gw, Ticket) == N
    assert await _count(gw, Raw) == N
    async with gw.store.read() as session:
        subjects = set((await session.scalars(select(Ticket.subject))).all())
    assert subjects == {f"Question {i}" for i in range(N)}


async def test_a_failed_commit_answers_451_to_every_mail_of_its_batch_and_keeps_nothing(
        make_gateway: Any) -> None:
    gw = await _gateway(make_gateway)
    mails = _mails("Lost?", N)
    async with commit_fails(gw.store):
        replies = await _send_all(gw.inbound_port, mails)
        assert gw.pipeline.commits.largest > 1
    assert [(r.code, r.stage) for r in replies] == [(451, "data")] * N
    assert all(r.message.startswith("4.3.0") for r in replies)
    for model in (Ticket, Message, Raw, Event, Contact):
        assert await _count(gw, model) == 0, model.__tablename__  # nothing half-written
    # The MTA retries: every mail is then stored, once.
    again = await _send_all(gw.inbound_port, mails)
    assert [r.code for r in again] == [250] * N
    assert await _count(gw, Message, Message.direction == "in") == N


async def test_a_duplicate_inside_a_batch_answers_duplicate_and_neighbours_are_stored(
        make_gateway: Any) -> None:
    gw = await _gateway(make_gateway)
    same = make_mail(subject="Twice", message_id="<twice@example.org>")
    others = _mails("Other", 4)
    replies = await _send_all(gw.inbound_port, [same, *others, same, same])
    assert [r.code for r in replies] == [250] * 7
    assert gw.pipeline.commits.largest > 1
    answers = [replies[0], replies[5], replies[6]]
    assert sum(_ticket(r) is not None for r in answers) == 1
    assert sorted(r.message for r in answers if _ticket(r) is None) == \
        [R250_DUPLICATE[4:]] * 2
    assert all(_ticket(r) is not None for r in replies[1:5])
    assert await _count(gw, Message, Message.message_id == "twice@example.org") == 1
    assert await _count(gw, Message, Message.direction == "in") == 5


async def test_an_smtp_mail_is_written_without_looking_first_and_its_redelivery_is_found(
        make_gateway: Any, monkeypatch: Any) -> None:
    """messages.fingerprint is unique: a redelivery over SMTP fails its INSERT, and the retry
    looks for it and answers duplicate. IMAP, which meets kept mails often, looks first."""
    gw = await make_gateway()
    looked: list[bool] = []
    find = repo.find_by_fingerprint

    async def looking(session: Any, fingerprint: str) -> Any:
        found = await find(session, fingerprint)
        looked.append(found is not None)
        return found

    monkeypatch.setattr(repo, "find_by_fingerprint", looking)
    mail = make_mail(subject="Once", message_id="<once@example.org>")
    first = await send(gw.inbound_port, mail)
    assert first.code == 250 and _ticket(first) is not None
    assert looked == []  # written straight away
    again = await send(gw.inbound_port, mail)
    assert (again.code, again.message) == (250, R250_DUPLICATE[4:])
    assert looked == [True]  # the retry after the conflict found the first one
    assert await _count(gw, Message, Message.message_id == "once@example.org") == 1
    polled = Envelope("c@example.org", ("support@example.test",), channel="imap")
    verdict = await gw.pipeline.ingest(make_mail(subject="Polled"), polled)
    assert verdict.outcome is Outcome.STORED and looked == [True, False]
    assert (await gw.pipeline.ingest(mail, polled)).outcome is Outcome.DUPLICATE
    assert looked == [True, False, True]


async def test_one_mail_failing_inside_a_batch_fails_alone(make_gateway: Any) -> None:
    gw = await _gateway(make_gateway)
    others = _mails("Fine", 5)
    async with mail_fails(gw.store, "Poison"):
        replies = await _send_all(gw.inbound_port, [make_mail(subject="Poison"), *others])
    assert gw.pipeline.commits.largest > 1
    assert replies[0].code == 451
    assert [r.code for r in replies[1:]] == [250] * 5
    assert await _count(gw, Ticket, Ticket.subject == "Poison") == 0
    assert await _count(gw, Message, Message.direction == "in") == 5
    assert await _count(gw, Raw) == 5  # the poisoned mail's raw copy went with its savepoint


async def test_a_conflicting_unit_is_retried_alone_and_its_neighbours_commit(
        db_url: str) -> None:
    """IntegrityError (another writer made the row first) rolls back that unit's savepoint
    only; it is queued again, and after its attempts its caller gets the error."""
    store = Store(db_url)
    commits = GroupCommit(store, linger_s=GATHER_S)
    now = datetime.now(UTC)
    tries: list[int] = []

    def contact(email: str) -> Any:
        async def unit(session: Any) -> str:
            await session.execute(insert(Contact).values(email=email, name="", created_at=now))
            return email
        return unit

    try:
        results = await asyncio.gather(
            commits.run(contact("a@example.org")),
            commits.run(contact("a@example.org"), on_conflict=lambda n, _: tries.append(n)),
            commits.run(contact("b@example.org")), return_exceptions=True)
        assert results[0] == "a@example.org" and results[2] == "b@example.org"
        assert isinstance(results[1], IntegrityError)
        assert tries == [1, 2, 3]
        assert commits.largest == 3
        async with store.read() as session:
            emails = sorted((await session.scalars(select(Contact.email))).all())
        assert emails == ["a@example.org", "b@example.org"]
    finally:
        await store.dispose()



async def _run_units(db_url: str, *units: Any) -> tuple[list[Any], list[str], int]:
    """The units in one batch: (their results or errors, the contacts kept, SAVEPOINTs
    that went through SQLAlchemy)."""
    store = Store(db_url)
    commits = GroupCommit(store, linger_s=GATHER_S, writers=1)
    through_sqlalchemy = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("SAVEPOINT"):
            through_sqlalchemy.append(statement)

    event.listen(store.engine.sync_engine, "before_cursor_execute", seen)
    try:
        results = await asyncio.gather(*(commits.run(u, attempts=1) for u in units),
                                       return_exceptions=True)
        assert commits.largest == len(units) and commits.batches == 1
        async with store.read() as session:
            emails = sorted((await session.scalars(select(Contact.email))).all())
    finally:
        await store.dispose()
    return results, emails, len(through_sqlalchemy)


def _direct(email: str) -> Any:
    async def unit(session: Any) -> int:
        return int(await repo.insert_row(session, Contact, {"email": email, "created_at": NOW}))
    return unit


async def test_units_savepoints_go_past_sqlalchemy_until_a_unit_uses_the_orm(
        db_url: str) -> None:
    """Only the batch's first SAVEPOINT on PostgreSQL goes through SQLAlchemy (its asyncpg
    adapter begins the transaction with it; on SQLite the session's BEGIN did); a unit
    that then works on the session's objects gets a nested transaction of SQLAlchemy's
    own, and what it only added to the session is flushed inside its savepoint."""
    async def orm_added(session: Any) -> str:
        session.add(Contact(email="added@example.org", created_at=NOW))
        return "added"

    async def orm_read(session: Any) -> int:
        return int(await session.scalar(select(func.count()).select_from(Contact)))

    results, emails, through = await _run_units(
        db_url, _direct("a@example.org"), _direct("b@example.org"), orm_added, orm_read)
    assert results[2:] == ["added", 3]  # the ORM saw the direct writes of the batch
    assert emails == ["a@example.org", "added@example.org", "b@example.org"]
    # A nested one for orm_added's flush (a plain query with nothing pending can neither
    # flush nor leave the session unusable), and PostgreSQL's first.
    assert through == (2 if db_url.startswith("postgresql") else 1)


async def test_on_postgresql_a_units_release_goes_in_one_round_trip_with_the_next_savepoint(
        db_url: str) -> None:
    """Four units of one insert each: SQLite gets 4 SAVEPOINTs and 4 RELEASEs; PostgreSQL,
    after its first SAVEPOINT (through SQLAlchemy), 3 round trips of RELEASE plus SAVEPOINT
    and no RELEASE of the last one (COMMIT releases it)."""
    before = direct.executed
    results, emails, _ = await _run_units(db_url, *(_direct(f"{c}@example.org") for c in "abcd"))
    assert all(isinstance(r, int) for r in results)
    assert emails == [f"{c}@example.org" for c in "abcd"]
    controls = direct.executed - before - 4  # the inserts
    assert controls == (3 if db_url.startswith("postgresql") else 4 + 4)


async def test_on_sqlite_a_batch_takes_the_write_lock_before_its_first_savepoint(
        sqlite_url: str, monkeypatch: Any) -> None:
    """The first SAVEPOINT goes to the driver directly: BEGIN IMMEDIATE must have run first,
    or SQLite would begin a deferred transaction with it and take the lock only later."""
    seen: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> Any:
        connection = connect(*args, **kwargs)
        connection.set_trace_callback(seen.append)
        return connection

    monkeypatch.setattr(sqlite3, "connect", traced)
    results, emails, through = await _run_units(sqlite_url, _direct("a@example.org"),
                                                _direct("b@example.org"))
    assert emails == ["a@example.org", "b@example.org"] and through == 0
    begin = next(i for i, sql in enumerate(seen) if sql.startswith("BEGIN"))
    assert seen[begin] == "BEGIN IMMEDIATE"
    assert seen.index("SAVEPOINT deskgate_unit") > begin


async def test_a_unit_whose_orm_flush_fails_fails_alone(db_url: str) -> None:
    """A failed flush would leave SQLAlchemy's session unusable for the whole batch were
    it not inside a nested transaction of its own."""
    async def flush_fails(session: Any) -> None:
        await repo.insert_row(session, Contact, {"email": "gone@example.org",
                                                 "created_at": NOW})
        session.add(Contact(email="a@example.org", created_at=NOW))  # a's row exists
        await session.flush()

    async def added_after(session: Any) -> str:
        session.add(Contact(email="after@example.org", created_at=NOW))
        return "after"

    results, emails, _ = await _run_units(
        db_url, _direct("a@example.org"), flush_fails, added_after, _direct("z@example.org"))
    assert isinstance(results[1], IntegrityError)
    assert results[2] == "after" and isinstance(results[3], int)
    assert emails == ["a@example.org", "after@example.org", "z@example.org"]


async def test_a_failed_unit_leaves_nothing_in_the_session_for_the_next_one(
        db_url: str) -> None:
    """A row the failed unit wrote and the ORM loaded is undone; SQLite gives its id to the
    next insert, whose own row the ORM must then read, not the undone one it held."""
    async def loads_then_fails(session: Any) -> None:
        contact_id = await _direct("undone@example.org")(session)
        assert (await session.get(Contact, contact_id)).email == "undone@example.org"
        raise RuntimeError("boom")

    async def loads_own(session: Any) -> str:
        contact_id = await _direct("kept@example.org")(session)
        return str((await session.get(Contact, contact_id)).email)

    async def left_pending_then_fails(session: Any) -> None:
        session.add(Contact(email="pending@example.org", created_at=NOW))
        raise RuntimeError("boom")

    results, emails, _ = await _run_units(
        db_url, loads_then_fails, loads_own, left_pending_then_fails, _direct("z@example.org"))
    assert isinstance(results[0], RuntimeError) and isinstance(results[2], RuntimeError)
    assert results[1] == "kept@example.org"
    assert emails == ["kept@example.org", "z@example.org"]  # pending@ was not flushed later


def _big_mail(subject: str) -> tuple[bytes, bytes]:
    """(attachment, mail): a mail over BIG_MAIL_BYTES, the size of one to offload."""
    payload = bytes(range(256)) * (BIG_MAIL_BYTES // 256)
    encoded = base64.encodebytes(payload).decode().replace("\n", "\r\n")
    big = ("From: Big <big@example.org>\r\nTo: support@example.test\r\n"
           f"Subject: {subject}\r\nMessage-ID: <big@example.org>\r\nMIME-Version: 1.0\r\n"
           'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
           "Content-Type: text/plain\r\n\r\nSee attached.\r\n--b\r\n"
           "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
           "Content-Disposition: attachment; filename=big.bin\r\n\r\n" + encoded +
           "--b--\r\n").encode()
    assert len(big) > BIG_MAIL_BYTES
    return payload, big


async def test_a_big_mail_is_parsed_in_another_process_and_stored_beside_a_batch(
        make_gateway: Any) -> None:
    """Over BIG_MAIL_BYTES a mail is parsed in the parser process and stored in a
    transaction of its own; the small mails around it still share theirs."""
    gw = await _gateway(make_gateway)
    payload, big = _big_mail("Big one")
    replies = await _send_all(gw.inbound_port, [big, *_mails("Small", 6)])
    assert [r.code for r in replies] == [250] * 7
    assert offload._pool is not None  # the parser process took the big one
    assert gw.pipeline.commits.largest > 1
    async with gw.store.read() as session:
        stored = (await session.execute(select(Attachment.size, Attachment.sha256)
                                        .where(Attachment.filename == "big.bin"))).one()
    assert tuple(stored) == (len(payload), hashlib.sha256(payload).hexdigest())
    assert await _count(gw, Message, Message.direction == "in") == 7


async def test_a_big_mails_pieces_commit_first_and_its_retry_after_a_451_reuses_them(
        make_gateway: Any) -> None:
    """The raw bytes of a big mail go to the store in pieces, each its own commit, before the
    rest (SQLite's write lock is held for one piece at a time: store/blobs.py): when the rest
    then fails, the sender gets 451 and only the pieces are there; its retry adds the rest,
    pointing at the same pieces."""
    gw = await _gateway(make_gateway)
    _, big = _big_mail("Big and unlucky")
    async with mail_fails(gw.store, "Big and unlucky"):
        failed = await send(gw.inbound_port, big)
    assert (failed.code, failed.stage) == (451, "data")
    pieces = await _count(gw, BlobPart)
    assert pieces == blobs.count_parts(len(big))
    for model in (Raw, Ticket, Message, Attachment, Contact):
        assert await _count(gw, model) == 0, model.__tablename__
    stored = await send(gw.inbound_port, big)
    assert (stored.code, stored.stage) == (250, "data")
    assert [await _count(gw, model) for model in (Raw, Ticket, Attachment)] == [1] * 3
    assert await _count(gw, BlobPart) == pieces
    assert await _count(gw, Message, Message.direction == "in") == 1
    async with gw.store.read() as session:
        message_raw = await session.scalar(select(Message.raw_sha256)
                                           .where(Message.direction == "in"))
        raw = await blobs.read_raw(session, message_raw)
    assert raw is not None and hashlib.sha256(raw).hexdigest() == message_raw
    assert raw.endswith(b"--b--\r\n")


async def test_sqlite_writers_take_turns_between_batches_and_other_transactions() -> None:
    """Big mails' own transactions queued first do not all go before a waiting batch: the
    lanes alternate; a writer cancelled while waiting is skipped and the queue goes on."""
    queue, order = WriterQueue(), []

    async def writer(name: str, lane: int) -> None:
        async with queue.hold(lane):
            order.append(name)
            await asyncio.sleep(0.01)

    tasks = [asyncio.create_task(writer(f"big{i}", 0)) for i in range(3)]
    await asyncio.sleep(0)
    gone = asyncio.create_task(writer("gone", 0))
    tasks += [asyncio.create_task(writer(f"batch{i}", 1)) for i in range(3)]
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(*tasks)
    assert order == ["big0", "batch0", "big1", "batch1", "big2", "batch2"]
    async with queue.hold(0):  # free again: taken at once
        pass
