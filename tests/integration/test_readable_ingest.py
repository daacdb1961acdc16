"""Ingest stores the readable views of a mail (issue 12); ticket show prints the new words."""

from __future__ import annotations

import hashlib
from typing import Any

from gateway.cli import _print_ticket
from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Outcome, Pipeline
from store import queries
from store.engine import Store
from tests.conftest import make_settings

GERMAN_REPLY_WITH_LOGO = (
    b"From: Max <max@example.org>\r\nTo: support@example.test\r\nSubject: Bestellung 4711\r\n"
    b"Message-ID: <r1@example.org>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/related; boundary=b\r\n\r\n--b\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    b"<p>Das Paket ist leider noch immer nicht angekommen.</p><img src=\"cid:logo@x\">"
    b"<img src=\"https://tracker.example/o.gif\"><script>x()</script>"
    b"<p>Am 20.11.2026 um 09:00 schrieb Support &lt;support@example.test&gt;:</p>"
    b"<blockquote>Ihre Bestellung wurde versandt.</blockquote>\r\n--b\r\n"
    b"Content-Type: image/png\r\nContent-ID: <logo@x>\r\n\r\nPNG\r\n--b--\r\n")


async def _ingest_and_show(url: str, raw: bytes) -> dict[str, Any]:
    store = Store(url)
    pipeline = Pipeline(make_settings(url), store)
    await pipeline.start()
    try:
        verdict = await pipeline.ingest(raw, Envelope("max@example.org", ("support@example.test",)))
        assert verdict.outcome is Outcome.STORED and verdict.ticket_number is not None
        async with store.transaction() as session:
            return await queries.ticket_detail(session, verdict.ticket_number)
    finally:
        await store.dispose()


async def test_ingest_stores_visible_text_safe_html_and_language(sqlite_url: str) -> None:
    message = (await _ingest_and_show(sqlite_url, GERMAN_REPLY_WITH_LOGO))["thread"][0]
    assert message["visible_text"] == "Das Paket ist leider noch immer nicht angekommen."
    assert "Ihre Bestellung wurde versandt." in message["text"]
    assert message["language"] == "de"
    assert "<script" not in message["html_safe"] and "tracker.example" not in message["html_safe"]
    assert f'/attachments/{hashlib.sha256(b"PNG").hexdigest()}' in message["html_safe"]
    assert [(a["content_id"], a["inline"]) for a in message["attachments"]] == [("logo@x", True)]


async def test_ticket_show_prints_the_new_words_and_full_prints_everything(
        sqlite_url: str, capsys: Any) -> None:
    detail = await _ingest_and_show(sqlite_url, GERMAN_REPLY_WITH_LOGO)
    _print_ticket(detail)
    short = capsys.readouterr().out
    _print_ticket(detail, full=True)
    full = capsys.readouterr().out
    assert "nicht angekommen" in short and "versandt" not in short
    assert "nicht angekommen" in full and "versandt" in full


async def test_a_big_mail_gets_the_same_views_from_the_parser_process(sqlite_url: str) -> None:
    # Over BIG_MAIL_BYTES the parse, quote cut, language guess and attachments are made in
    # the parser process (offload.in_process), not on the loop: the views are the same.
    from gateway.ingest.offload import BIG_MAIL_BYTES

    png = b"PNG" + b"".join(b"%075d\r\n" % i for i in range(4_000))  # 300 KiB, CRLF lines
    raw = GERMAN_REPLY_WITH_LOGO.replace(b"\r\n\r\nPNG\r\n", b"\r\n\r\n" + png + b"\r\n")
    assert len(raw) > BIG_MAIL_BYTES
    message = (await _ingest_and_show(sqlite_url, raw))["thread"][0]
    assert message["visible_text"] == "Das Paket ist leider noch immer nicht angekommen."
    assert message["language"] == "de"
    assert "<script" not in message["html_safe"] and "tracker.example" not in message["html_safe"]
    assert f'/attachments/{hashlib.sha256(png).hexdigest()}' in message["html_safe"]
    assert [(a["content_id"], a["inline"], a["size"]) for a in message["attachments"]] == [
        ("logo@x", True, len(png))]
