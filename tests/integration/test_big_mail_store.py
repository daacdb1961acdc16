"""A big mail's raw bytes and attachment are stored exactly on both stores (on SQLite its
statements leave the loop's thread: store/sqlite_inline.py); the same mail again adds
nothing."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import replace
from typing import Any

from sqlalchemy import func, select

from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Outcome
from store.models import Attachment, Raw


def _big_mail(payload: bytes) -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return (b"From: Jess <jess@example.org>\r\nTo: support@example.test\r\n"
            b"Subject: The logs\r\nMessage-ID: <big.blob@example.org>\r\n"
            b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
            b"Content-Type: text/plain\r\n\r\nLogs attached.\r\n--b\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=logs.bin\r\n\r\n"
            + encoded + b"--b--\r\n")


async def test_a_big_mail_is_stored_exactly_once_on_both_stores(make_gateway: Any) -> None:
    gw = await make_gateway()
    settings = gw.pipeline.settings
    gw.pipeline.settings = replace(settings, inbound=replace(settings.inbound,
                                                             max_attachment_bytes=10 * 2**20))
    payload = bytes(range(256)) * 9_000 + b"tail"  # 2.3 MB, not a multiple of a piece
    raw = _big_mail(payload)
    envelope = Envelope(mail_from="jess@example.org", rcpt_tos=("support@example.test",),
                        peer="127.0.0.1:1", channel="smtp")
    first = await gw.pipeline.ingest(raw, envelope)
    again = await gw.pipeline.ingest(raw, envelope)
    async with gw.store.read() as session:
        stored = await session.scalar(select(Raw.content).where(
            Raw.sha256 == hashlib.sha256(raw).hexdigest()))
        raws = await session.scalar(select(func.count()).select_from(Raw))
        files = (await session.execute(select(Attachment.filename, Attachment.content))).all()
    assert (first.outcome, again.outcome) == (Outcome.STORED, Outcome.DUPLICATE)
    assert bytes(stored) == raw and raws == 1
    assert [(name, bytes(content)) for name, content in files] == [("logs.bin", payload)]
