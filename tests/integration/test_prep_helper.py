"""The helper process that parses small mails (gateway/ingest/prep.py): a real child process,
its answers the same as this process's, and every way it can fail ends with the mail
prepared here instead."""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import select

from gateway.ingest import prep
from gateway.ingest.offload import BIG_MAIL_BYTES
from gateway.ingest.prep import Preparer, prepare
from gateway.ingest.readable import DEFAULT_CID_URL
from gateway.settings import ConfigError, parse_settings
from store.models import Message
from tests.conftest import settings_text
from tests.mailbuild import make_mail, send

CID = DEFAULT_CID_URL
GERMAN = ("Guten Tag, meine Bestellung ist leider immer noch nicht angekommen. Können Sie "
          "bitte nachsehen, wo sie bleibt?\r\n\r\n> Am Montag schrieb der Support:\r\n"
          "> Ihre Bestellung wurde versandt.")


@pytest.fixture
async def preparer() -> AsyncIterator[Preparer]:
    helper = Preparer(CID)
    assert await helper.start()
    yield helper
    await helper.stop()


def _pid(helper: Preparer) -> int:
    assert helper._process is not None  # noqa: SLF001
    return helper._process.pid  # noqa: SLF001


def _corpus(corpus: Path) -> list[bytes]:
    with (corpus / "manifest.tsv").open(newline="", encoding="utf-8") as handle:
        paths = [row["path"] for row in csv.DictReader(handle, delimiter="\t")]
    mails = [(corpus / path).read_bytes() for path in paths]
    return [raw for raw in mails if len(raw) <= BIG_MAIL_BYTES]


async def test_the_helper_answers_what_this_process_would_for_every_corpus_mail(
        preparer: Preparer, corpus_dir: Path) -> None:
    mails = _corpus(corpus_dir)
    assert len(mails) > 50
    answers = await asyncio.gather(*(preparer.prepare(raw) for raw in mails))
    assert preparer.answered == len(mails)  # each came from the helper, none from here
    for raw, answer in zip(mails, answers, strict=True):
        assert answer == prepare(raw, CID)
    assert {a.failure is None and a.mail is not None for a in answers} == {True}
    assert any(a.view is not None and a.view.language for a in answers)
    assert any(a.attachments for a in answers)


async def test_a_helper_killed_mid_request_leaves_every_mail_prepared_here(
        preparer: Preparer) -> None:
    raw = make_mail(subject="order 1234", body="My order did not arrive. " * 40)
    pid = _pid(preparer)
    os.kill(pid, signal.SIGSTOP)  # holds the requests in flight until the kill
    with structlog.testing.capture_logs() as logs:
        pending = [asyncio.ensure_future(preparer.prepare(raw)) for _ in range(5)]
        await asyncio.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        answers = await asyncio.gather(*pending)
    assert answers == [prepare(raw, CID)] * 5
    assert preparer.answered == 0
    assert not preparer.running
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["ingest.helper_failed"]


async def test_a_failed_helper_is_started_again_after_a_pause(
        preparer: Preparer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prep, "RESTART_PAUSE_S", 0.5)
    raw = make_mail(subject="hello", body="A question about my invoice.")
    first = _pid(preparer)
    os.kill(first, signal.SIGKILL)
    assert await preparer.prepare(raw) == prepare(raw, CID)  # here: the helper just died
    assert not preparer.running
    assert await preparer.prepare(raw) == prepare(raw, CID)  # within the pause: no restart
    assert preparer._starting is None  # noqa: SLF001
    await asyncio.sleep(0.6)
    await preparer.prepare(raw)  # asks for the restart, is itself prepared here
    assert preparer._starting is not None  # noqa: SLF001
    assert await preparer._starting  # noqa: SLF001
    assert preparer.running and _pid(preparer) != first
    assert await preparer.prepare(raw) == prepare(raw, CID)
    assert preparer.answered == 1


async def test_a_helper_that_does_not_answer_in_time_is_killed(
        preparer: Preparer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prep, "ANSWER_TIMEOUT_S", 0.3)
    raw = make_mail(subject="hello", body="Still waiting for my refund.")
    pid = _pid(preparer)
    os.kill(pid, signal.SIGSTOP)
    with structlog.testing.capture_logs() as logs:
        assert await preparer.prepare(raw) == prepare(raw, CID)
    assert [e.get("reason") for e in logs if e["event"] == "ingest.helper_failed"] == [
        "no answer in time"]
    await asyncio.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped


async def test_a_helper_that_cannot_start_leaves_the_work_here(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    helper = Preparer(CID)
    with structlog.testing.capture_logs() as logs:
        assert not await helper.start()
    assert [e["reason"] for e in logs if e["event"] == "ingest.helper_failed"] == [
        "start: FileNotFoundError"]
    raw = make_mail(subject="hello", body="Where is my parcel?")
    assert await helper.prepare(raw) == prepare(raw, CID)
    await helper.stop()


async def test_a_stop_ends_the_helper_and_a_stop_while_it_starts_kills_it() -> None:
    helper = Preparer(CID)
    assert await helper.start()
    process = helper._process  # noqa: SLF001
    assert process is not None
    await helper.stop()
    assert process.returncode == 0  # it read the end of its input and returned
    assert not helper.running

    starting = Preparer(CID)
    starting.launch()
    await asyncio.sleep(0.05)  # spawned, still loading
    await starting.stop()
    assert not starting.running
    raw = make_mail(subject="hello", body="After the stop.")
    assert await starting.prepare(raw) == prepare(raw, CID)  # no restart once stopped
    assert starting._starting is not None and starting._starting.done()  # noqa: SLF001


async def _helper_ready(helper: Preparer) -> None:
    for _ in range(200):
        if helper.running:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the daemon's helper did not start")


async def test_the_daemon_stores_a_mail_its_helper_prepared(make_gateway: Any) -> None:
    gateway = await make_gateway()
    await _helper_ready(gateway.preparer)
    reply = await send(gateway.inbound_port, make_mail(subject="Bestellung", body=GERMAN))
    assert reply.code == 250
    assert gateway.preparer.answered == 1
    async with gateway.store.transaction() as session:
        message = (await session.scalars(select(Message).where(Message.direction == "in"))).one()
    assert message.language == "de"
    assert message.visible_text is not None
    assert "Bestellung ist leider" in message.visible_text
    assert "versandt" not in message.visible_text  # the quote is cut by the helper's view
    assert "versandt" in message.text
    helper = gateway.preparer._process  # noqa: SLF001
    assert helper is not None
    await gateway.stop(drain_timeout_s=5)
    assert helper.returncode == 0


async def test_with_parse_helper_off_the_daemon_starts_none_and_parses_here(
        make_gateway: Any) -> None:
    gateway = await make_gateway(extra="parse_helper = false")
    assert gateway.preparer is None and gateway.pipeline.preparer is None
    reply = await send(gateway.inbound_port, make_mail(subject="Bestellung", body=GERMAN))
    assert reply.code == 250
    async with gateway.store.transaction() as session:
        message = (await session.scalars(select(Message).where(Message.direction == "in"))).one()
    assert message.language == "de"
    assert message.visible_text is not None and "versandt" not in message.visible_text


def test_parse_helper_must_be_true_or_false() -> None:
    text = settings_text("sqlite+aiosqlite:///x.db", extra='parse_helper = "yes"')
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, "t.toml")
    assert [p.split(": ", 1)[1] for p in caught.value.problems] == [
        "inbound.parse_helper: must be true/false, not 'yes'"]
