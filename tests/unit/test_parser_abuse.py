"""Hostile sizes and shapes (issue 11, protocol abuse): parse() finishes and its peak memory
stays within a bound proportional to the input; ingest stores or quarantines each one.

Peak memory is measured with tracemalloc (allocations by Python code, which is what the
email package's object tree costs); the figures are printed (`pytest -s` to see them).
Time is printed, not asserted (bench/ measures speed); pytest-timeout catches a stall.
"""

from __future__ import annotations

import base64
import time
import tracemalloc
from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from gateway.ingest.model import Envelope
from gateway.ingest.parse import MAX_MIME_DEPTH, parse
from gateway.ingest.pipeline import Outcome, Pipeline
from gateway.settings import parse_settings
from store.engine import Store
from store.models import Message, Quarantine, Raw
from tests.conftest import settings_text

MiB = 2**20
HEAD = b"From: a@example.org\r\nTo: support@example.test\r\nMessage-ID: <abuse@example.org>\r\n"


def _nested(depth: int, lines: int = 1) -> bytes:
    return HEAD + b"".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
        for i in range(depth)) + b"Content-Type: text/plain\r\n\r\n" + b"hi there\r\n" * lines


def _tiny_parts(count: int) -> bytes:
    return HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n' + (
        b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" * count) + b"--b--\r\n"


def _base64_part(size: int) -> tuple[bytes, bytes]:
    payload = bytes(range(256)) * (size // 256)
    wrapped = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return HEAD + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n' \
        b"Content-Type: text/plain\r\n\r\nsee the file\r\n--b\r\n" \
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n" \
        b'Content-Disposition: attachment; filename="big.bin"\r\n\r\n' + wrapped + \
        b"--b--\r\n", payload


BIG_B64, BIG_PAYLOAD = _base64_part(20 * MiB)

# name -> (raw mail, what must hold of the parsed result)
CASES: dict[str, tuple[bytes, Callable[..., bool]]] = {
    "1 MB header line": (
        HEAD + b"Subject: " + b"x" * 1_000_000 + b"\r\n\r\nbody\r\n",
        lambda m: m.fatal is None and len(m.subject) == 1_000_000),
    "1 MB folded header (330,000 lines)": (
        HEAD + b"Subject: x" + b"\r\n x" * 330_000 + b"\r\n\r\nbody\r\n",
        lambda m: (m.fatal or "").startswith("too many header lines")),
    "100,000 headers": (
        HEAD + b"X-H: v\r\n" * 100_000 + b"\r\nbody\r\n",
        lambda m: (m.fatal or "").startswith("too many header lines")),
    "9,000 headers (under the limit)": (
        HEAD + b"Received: from x by y; Mon, 1 Jan 2026 00:00:00 +0000\r\n" * 9_000 +
        b"\r\nbody\r\n",
        lambda m: m.fatal is None and len(m.header_all("received")) == 9_000),
    "5,000 nested multiparts around 100,000 lines": (
        _nested(5_000, 100_000),
        lambda m: m.fatal is None and "mime-unparsed:MimeTooDeep" in m.defects
        and m.text.count("hi there") == 100_000),
    f"{MAX_MIME_DEPTH - 1} nested multiparts (under the limit)": (
        _nested(MAX_MIME_DEPTH - 1, 3),
        lambda m: m.fatal is None and m.text.strip() == "hi there\r\nhi there\r\nhi there"),
    "5,000 nested message/rfc822": (
        HEAD + b"Content-Type: message/rfc822\r\n\r\n" * 5_000 + HEAD + b"\r\nhi\r\n",
        lambda m: m.fatal is None and len(m.attachments) == 1),
    "50,000 tiny parts": (
        _tiny_parts(50_000), lambda m: (m.fatal or "").startswith("too many MIME parts")),
    "5,000 tiny parts (under the limit)": (
        _tiny_parts(5_000), lambda m: m.fatal is None and m.text.strip() == "x"),
    "encoded-word storm": (
        b"From: " + b"=?utf-8?B?w6Q=?=" * 20_000 + b" <a@example.org>\r\nSubject: " +
        b"=?x-unknown?Q?=FF?= " * 20_000 + b"\r\n\r\nbody\r\n",
        lambda m: m.fatal is None and m.from_name == "ä" * 20_000),
    "20 MiB base64 attachment": (
        BIG_B64, lambda m: m.fatal is None and [a.payload for a in m.attachments] == [BIG_PAYLOAD]),
}


@pytest.mark.parametrize("name", CASES)
def test_parse_stays_within_time_and_memory(name: str) -> None:
    raw, holds = CASES[name]
    tracemalloc.start()
    started = time.perf_counter()
    try:
        mail = parse(raw)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"\n{name}: input {len(raw) / MiB:.2f} MiB, peak {peak / MiB:.1f} MiB "
          f"({peak / len(raw):.1f}x), {elapsed:.2f} s (under tracemalloc), "
          f"fatal={mail.fatal!r}")
    assert mail.from_addr == "a@example.org"
    assert holds(mail), (mail.fatal, mail.defects)
    # Generous: a fixed allowance for the interpreter's own objects plus 12x the input.
    assert peak < 12 * len(raw) + 8 * MiB


INGEST = [name for name in CASES if name != "20 MiB base64 attachment"]


async def test_ingest_stores_or_quarantines_each_hostile_mail(db_url: str) -> None:
    settings = parse_settings(settings_text(db_url), "abuse.toml")
    store = Store(db_url)
    pipeline = Pipeline(settings, store)
    await pipeline.start()
    try:
        for number, name in enumerate(INGEST):
            raw = CASES[name][0].replace(b"<abuse@example.org>", f"<a{number}@x.org>".encode())
            envelope = Envelope(mail_from="a@example.org", rcpt_tos=("support@example.test",))
            started = time.perf_counter()
            verdict = await pipeline.ingest(raw, envelope)
            print(f"\n{name}: {verdict.outcome.value} {verdict.reason!r} "
                  f"in {time.perf_counter() - started:.2f} s")
            expect = Outcome.STORED if parse(raw).fatal is None else Outcome.QUARANTINED
            assert verdict.outcome is expect, (name, verdict)
        async with store.transaction() as session:
            reasons = sorted(await session.scalars(select(Quarantine.reason)))
            stored = await session.scalar(select(func.count()).select_from(Message))
            raws = await session.scalar(select(func.count()).select_from(Raw))
    finally:
        await store.dispose()
    quarantined = [n for n in INGEST if parse(CASES[n][0]).fatal]
    assert len(reasons) == len(quarantined) == 3
    assert all(r.startswith(("too many header lines", "too many MIME parts")) for r in reasons)
    assert stored == len(INGEST) - len(quarantined)
    assert raws == len(INGEST)  # every byte kept, whatever became of the mail
