"""A big mail's raw bytes and attachment are stored exactly on both stores, in pieces each
committed on its own (store/blobs.py; on SQLite their statements leave the loop's thread:
store/sqlite_inline.py); the same mail again adds nothing; small mails commit between the
pieces; pieces no mail came back for are dropped after a day, and no others."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete, func, select

from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Outcome
from gateway.service import Gateway
from store import blobs, repo
from store.engine import Store
from store.models import Attachment, BlobPart, BlobValue, Raw
from tests.conftest import make_settings

ENVELOPE = Envelope(mail_from="jess@example.org", rcpt_tos=("support@example.test",),
                    peer="127.0.0.1:1", channel="smtp")


def _big_mail(payload: bytes, message_id: str = "big.blob@example.org") -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (b"From: Jess <jess@example.org>\r\nTo: support@example.test\r\n"
            b"Subject: The logs\r\nMessage-ID: <" + message_id.encode() + b">\r\n"
            b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
            b"Content-Type: text/plain\r\n\r\nLogs attached.\r\n--b\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=logs.bin\r\n\r\n"
            + encoded + b"--b--\r\n")


def _keep_big_attachments(gw: Any) -> Any:
    settings = gw.pipeline.settings
    gw.pipeline.settings = replace(settings, inbound=replace(settings.inbound,
                                                             max_attachment_bytes=20 * 2**20))
    return gw


async def _gateway(make_gateway: Any) -> Any:
    return _keep_big_attachments(await make_gateway())


async def _pieces(gw: Any) -> int:
    async with gw.store.read() as session:
        return int(await session.scalar(select(func.count()).select_from(BlobPart)))


async def test_a_big_mail_is_stored_exactly_once_on_both_stores(make_gateway: Any) -> None:
    gw = await _gateway(make_gateway)
    payload = bytes(range(256)) * 9_000 + b"tail"  # 2.3 MB, not a multiple of a piece
    raw = _big_mail(payload)
    first = await gw.pipeline.ingest(raw, ENVELOPE)
    again = await gw.pipeline.ingest(raw, ENVELOPE)
    async with gw.store.read() as session:
        row = await session.get(Raw, hashlib.sha256(raw).hexdigest())
        stored = await blobs.read_raw(session, hashlib.sha256(raw).hexdigest())
        raws = await session.scalar(select(func.count()).select_from(Raw))
        files = list(await session.scalars(select(Attachment)))
        kept = [(a.filename, await blobs.read_attachment(session, a)) for a in files]
    assert (first.outcome, again.outcome) == (Outcome.STORED, Outcome.DUPLICATE)
    assert stored == raw and raws == 1
    assert row is not None and row.parts == blobs.count_parts(len(raw)) == 4
    assert (row.content, row.size) == (b"", len(raw))
    assert kept == [("logs.bin", payload)]
    assert files[0].parts == 3 and files[0].content is None
    assert await _pieces(gw) == 4 + 3  # the redelivery wrote none


async def test_small_mails_commit_between_the_pieces_of_a_big_one(sqlite_url: str) -> None:
    """SQLite has one write lock: a small mail that arrives while a big one is stored waits
    for one piece, not for the whole value (PostgreSQL has no such lock to test)."""
    gw = Gateway(make_settings(sqlite_url))
    await gw.start(port=0)
    try:
        await _small_between_pieces(_keep_big_attachments(gw))
    finally:
        await gw.stop(drain_timeout_s=5)


async def _small_between_pieces(gw: Any) -> None:
    raw = _big_mail(bytes(range(256)) * 24_000)  # a 6 MB attachment: 9 + 6 pieces
    total = blobs.count_parts(len(raw)) + blobs.count_parts(256 * 24_000)
    big = asyncio.create_task(gw.pipeline.ingest(raw, ENVELOPE))
    for _ in range(5000):
        if await _pieces(gw):
            break
        await asyncio.sleep(0.001)
    small = await gw.pipeline.ingest(
        b"From: ann@example.org\r\nTo: support@example.test\r\nSubject: Quick one\r\n"
        b"Message-ID: <small@example.org>\r\n\r\nHello.\r\n", ENVELOPE)
    stored_then = await _pieces(gw)
    assert small.outcome is Outcome.STORED and not big.done()
    assert 0 < stored_then < total
    assert (await big).outcome is Outcome.STORED
    assert await _pieces(gw) == total


async def test_pieces_nobody_claimed_are_dropped_after_a_day(make_gateway: Any) -> None:
    gw = await _gateway(make_gateway)
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    old = now - blobs.ORPHAN_AGE - timedelta(minutes=1)
    value = bytes(range(256)) * 5_000  # 1.3 MB: two pieces each
    sha = {name: hashlib.sha256(name.encode() + value).hexdigest()
           for name in ("orphan", "claimed", "fresh", "retried")}
    for name in ("orphan", "claimed", "retried"):
        assert await blobs.keep_in_parts(gw.store, sha[name], name.encode() + value, old) == 2
    await blobs.keep_in_parts(gw.store, sha["fresh"], b"fresh" + value, now)
    async with gw.store.transaction() as session:  # the mail that came back for its pieces
        await repo.put_raw(session, sha["claimed"], b"claimed" + value, old, parts=2)
    # A redelivery an hour before the sweep reuses the old pieces: they count as fresh.
    await blobs.keep_in_parts(gw.store, sha["retried"], b"retried" + value,
                              now - timedelta(hours=1))
    # A stored mail's attachment, whose bytes another mail then sent again and gave up on.
    payload = bytes(range(256)) * 9_000
    raw = _big_mail(payload)
    await gw.pipeline.ingest(raw, ENVELOPE)
    attachment = hashlib.sha256(payload).hexdigest()
    await blobs.keep_in_parts(gw.store, attachment, payload, old)
    assert await blobs.drop_orphans(gw.store, now) == 1
    async with gw.store.read() as session:
        left = set(await session.scalars(select(BlobPart.sha256)))
        marked = set(await session.scalars(select(BlobValue.sha256)))
        claimed = await blobs.read_raw(session, sha["claimed"])
        kept = await blobs.read_attachment(session, await session.scalar(select(Attachment)))
    assert left == {sha["claimed"], sha["fresh"], sha["retried"], attachment,
                    hashlib.sha256(raw).hexdigest()}
    assert marked == {sha["fresh"], sha["retried"]}
    assert (claimed, kept) == (b"claimed" + value, payload)
    assert await blobs.drop_orphans(gw.store, now) == 0


async def test_pieces_of_bytes_already_stored_inline_are_not_claimed(make_gateway: Any
                                                                     ) -> None:
    """A mail stored whole before migration 0003, then sent again in pieces: the row that
    stays is the inline one, so nothing points at the pieces and the sweep drops them."""
    gw = await _gateway(make_gateway)
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    old = now - blobs.ORPHAN_AGE - timedelta(minutes=1)
    raw = bytes(range(256)) * 5_000
    sha = hashlib.sha256(raw).hexdigest()
    async with gw.store.transaction() as session:
        await repo.put_raw(session, sha, raw, old)  # inline, as 0002 stored it
    assert await blobs.keep_in_parts(gw.store, sha, raw, old) == 2
    async with gw.store.transaction() as session:
        await repo.put_raw(session, sha, raw, old, parts=2)
    async with gw.store.read() as session:
        assert await session.scalar(select(BlobValue.sha256)) == sha  # still nobody's
    assert await blobs.drop_orphans(gw.store, now) == 1
    assert await _pieces(gw) == 0
    async with gw.store.read() as session:
        assert await blobs.read_raw(session, sha) == raw


async def test_a_big_unparseable_mail_is_quarantined_in_pieces(make_gateway: Any) -> None:
    gw = await make_gateway()
    raw = b"this is no mail, it has no header section\r\n" * 30_000  # 1.3 MB
    first = await gw.pipeline.ingest(raw, ENVELOPE)
    again = await gw.pipeline.ingest(raw, ENVELOPE)
    assert (first.outcome, again.outcome) == (Outcome.QUARANTINED, Outcome.DUPLICATE)
    sha = hashlib.sha256(raw).hexdigest()
    async with gw.store.read() as session:
        row = await session.get(Raw, sha)
        assert row is not None and (row.parts, row.content) == (2, b"")
        assert await blobs.read_raw(session, sha) == raw
        assert await session.scalar(select(func.count()).select_from(BlobValue)) == 1
    assert await _pieces(gw) == 2  # the redelivery found them; its mark waits for the sweep


async def test_a_missing_piece_is_named_not_papered_over(make_gateway: Any) -> None:
    gw = await _gateway(make_gateway)
    raw = _big_mail(bytes(range(256)) * 9_000)
    sha = hashlib.sha256(raw).hexdigest()
    await gw.pipeline.ingest(raw, ENVELOPE)
    async with gw.store.transaction() as session:
        await session.execute(delete(BlobPart).where(BlobPart.sha256 == sha, BlobPart.seq == 1))
    async with gw.store.read() as session:
        with pytest.raises(blobs.MissingParts, match=r"3 pieces of \d+ bytes stored where 4 "):
            await blobs.read_raw(session, sha)


async def test_each_piece_calls_the_checkpointer_at_once(sqlite_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of pieces must not wait for the next tick to leave the WAL: the commit that
    crosses wal_autocheckpoint would then copy it out itself, holding the write lock."""
    store = Store(sqlite_url)
    calls: list[float] = []
    real = store.checkpoint

    async def counted() -> None:
        calls.append(asyncio.get_running_loop().time())
        await real()

    monkeypatch.setattr(store, "checkpoint", counted)
    ticking = asyncio.create_task(store.checkpoints(every_s=3600))
    try:
        now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
        await blobs.keep_in_parts(store, "a" * 64, bytes(3 * blobs.PART_BYTES), now)
        for _ in range(500):
            if calls:
                break
            await asyncio.sleep(0.01)
        assert calls
    finally:
        ticking.cancel()
        # Let it leave a checkpoint it was in (its connection goes back to the pool) before
        # the pool goes; otherwise the garbage collector finds that connection later.
        await asyncio.gather(ticking, return_exceptions=True)
        await store.dispose()


async def test_an_attachment_over_the_limit_is_hashed_off_the_loop(
        make_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Over a piece's size an attachment's hash is taken in a thread before the mail's
    # transaction, kept or not: a 37 MiB one over the limit, hashed on the loop inside the
    # transaction, stalled every session (bench/run.py's 50 MiB mail).
    import threading

    from gateway.ingest import pipeline

    hashed_on: list[int] = []
    real = pipeline._sha256

    def spy(data: bytes) -> str:
        hashed_on.append(threading.get_ident())
        return real(data)

    monkeypatch.setattr(pipeline, "_sha256", spy)
    gw = await make_gateway()  # max_attachment_bytes = 65536
    payload = bytes(range(256)) * 6_000  # 1.5 MiB
    assert (await gw.pipeline.ingest(_big_mail(payload), ENVELOPE)).outcome is Outcome.STORED
    async with gw.store.read() as session:
        row = (await session.scalars(select(Attachment))).one()
    assert (row.content, row.parts, row.size) == (None, 0, len(payload))
    assert row.sha256 == hashlib.sha256(payload).hexdigest()
    assert hashed_on and threading.get_ident() not in hashed_on
