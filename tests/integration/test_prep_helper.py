"""The helper process that parses small mails (gateway/ingest/prep.py): a real child process,
its answers the same as this process's, and every way it can fail ends with the mail
prepared here instead."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import select

from gateway.ingest import pipeline as pipeline_module
from gateway.ingest import prep
from gateway.ingest.model import Envelope
from gateway.ingest.offload import BIG_MAIL_BYTES
from gateway.ingest.prep import Preparer, prepare
from gateway.ingest.readable import DEFAULT_CID_URL
from gateway.settings import ConfigError, parse_settings
from store.models import Message
from tests.conftest import ROOT, make_settings, need_peer, note_offloads, settings_text
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
        preparer: Preparer, monkeypatch: pytest.MonkeyPatch) -> None:
    offloaded = note_offloads(monkeypatch, prep)
    raw = make_mail(subject="order 1234", body="My order did not arrive. " * 40)
    pid = _pid(preparer)
    os.kill(pid, signal.SIGSTOP)  # holds the requests in flight until the kill
    with structlog.testing.capture_logs() as logs:
        pending = [asyncio.ensure_future(preparer.prepare(raw)) for _ in range(5)]
        await asyncio.sleep(0.2)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        answers = await asyncio.gather(*pending)
    assert time.monotonic() - killed < prep.ANSWER_TIMEOUT_S / 4  # the loss, not the timeout
    assert answers == [prepare(raw, CID)] * 5
    assert preparer.answered == 0
    assert not preparer.running
    assert [e["reason"] for e in logs if e["log_level"] == "warning"] == [
        "read: IncompleteReadError"]
    assert len(offloaded) == 5  # each was with the helper: prepared in the parser pool


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
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prep, "ANSWER_TIMEOUT_S", 0.3)
    offloaded = note_offloads(monkeypatch, prep)
    helper = Preparer(CID)
    assert await helper.start()
    raw = make_mail(subject="hello", body="Still waiting for my refund.")
    big = make_mail(subject="hello", body="x" * 200_000)  # more than the pipe holds
    pid = _pid(helper)
    os.kill(pid, signal.SIGSTOP)
    try:
        with structlog.testing.capture_logs() as logs:
            answers = await asyncio.wait_for(
                asyncio.gather(helper.prepare(raw), helper.prepare(big)), 5)
        assert answers == [prepare(raw, CID), prepare(big, CID)]
        assert [e.get("reason") for e in logs if e["event"] == "ingest.helper_failed"] == [
            "no answer in time"]
        assert len(offloaded) == 2
        await asyncio.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # killed and reaped
    finally:
        await helper.stop()


async def test_requests_queued_behind_answered_ones_are_not_late(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prep, "ANSWER_TIMEOUT_S", 0.4)
    helper = Preparer(CID)
    assert await helper.start()
    pid = _pid(helper)
    raw = make_mail(body=("A long paragraph about my order and its troubles. " * 12
                          + "\r\n\r\n") * 200)  # 1-3 ms each in the helper

    async def slow_but_alive() -> None:
        """Paused 0.1 s, working 0.05 s, over and over: never silent for the limit, and the
        requests' work (0.3 s or more) spans several pauses."""
        try:
            while True:
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(0.1)
                os.kill(pid, signal.SIGCONT)
                await asyncio.sleep(0.05)
        finally:
            os.kill(pid, signal.SIGCONT)

    toggling = asyncio.ensure_future(slow_but_alive())
    try:
        started = time.monotonic()
        answers = await asyncio.gather(*(helper.prepare(raw) for _ in range(300)))
        assert time.monotonic() - started > prep.ANSWER_TIMEOUT_S  # longer than the limit...
        assert helper.answered == 300 and helper.running  # ...and nothing was late
        assert answers[-1] == prepare(raw, CID)
    finally:
        toggling.cancel()
        await asyncio.gather(toggling, return_exceptions=True)
        await helper.stop()


async def test_a_caller_that_goes_away_leaves_the_next_answers_right(
        preparer: Preparer) -> None:
    first = make_mail(subject="first", body="The first question.")
    second = make_mail(subject="second", body="The second question.")
    dropped = asyncio.ensure_future(preparer.prepare(first))
    await asyncio.sleep(0)
    dropped.cancel()  # the SMTP session went away
    assert (await preparer.prepare(second)) == prepare(second, CID)
    assert preparer.running and not preparer._waiting  # noqa: SLF001


async def test_a_helper_running_other_code_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prep, "CODE", "code-before-an-upgrade")
    helper = Preparer(CID)
    with structlog.testing.capture_logs() as logs:
        assert not await helper.start()
    assert [e["detail"] for e in logs if e["event"] == "ingest.helper_failed"] == [
        "its code differs from this process's: restart deskgate"]
    await helper.stop()
    assert _helpers() == set()


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


def _helpers() -> set[int]:
    """This process's children that are helpers."""
    found = set()
    for task in Path("/proc/self/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if b"gateway.ingest.prep" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.add(int(child))
    return found


async def test_a_stop_ends_the_helper_and_a_stop_while_it_starts_kills_it() -> None:
    before = _helpers()
    helper = Preparer(CID)
    assert await helper.start()
    process = helper._process  # noqa: SLF001
    assert process is not None and _helpers() - before == {process.pid}
    await helper.stop()
    assert process.returncode == 0  # it read the end of its input and returned
    assert _helpers() == before

    starting = Preparer(CID)
    starting.launch()
    for _ in range(100):  # spawned, still loading
        if _helpers() - before:
            break
        await asyncio.sleep(0.01)
    assert _helpers() - before
    await starting.stop()
    assert _helpers() == before
    raw = make_mail(subject="hello", body="After the stop.")
    assert await starting.prepare(raw) == prepare(raw, CID)  # no restart once stopped
    assert starting._starting is not None and starting._starting.done()  # noqa: SLF001


async def test_the_helper_dies_with_its_serving_process(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import asyncio\n"
        "from gateway.ingest.prep import Preparer\n"
        "async def main():\n"
        "    helper = Preparer('/a/{sha256}')\n"
        "    assert await helper.start()\n"
        "    print('helper', helper._process.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n")
    parent = await asyncio.create_subprocess_exec(sys.executable, str(script), cwd=ROOT,
                                                  stdout=asyncio.subprocess.PIPE)
    assert parent.stdout is not None
    line = b""
    while not line.startswith(b"helper "):  # structlog's lines come first
        line = await asyncio.wait_for(parent.stdout.readline(), 60)
    pid = int(line.split()[1])
    os.kill(pid, signal.SIGSTOP)  # stuck: it would never read the end of its input
    parent.kill()
    await parent.wait()
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or \
                Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        await asyncio.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError("the helper outlived its serving process")


async def _helper_ready(helper: Preparer) -> None:
    for _ in range(200):
        if helper.running:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the daemon's helper did not start")


async def test_the_daemon_stores_a_mail_its_helper_prepared(
        make_gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_module, "HELPER_ABOVE_INFLIGHT", 0)  # even a mail alone
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


async def test_a_mail_alone_is_prepared_here_and_mails_together_in_the_helper(
        make_gateway: Any) -> None:
    gateway = await make_gateway()
    await _helper_ready(gateway.preparer)
    envelope = Envelope(mail_from="jess@example.org", rcpt_tos=("support@example.test",),
                        peer="test", channel="smtp")
    verdict = await gateway.pipeline.ingest(make_mail(subject="alone", body=GERMAN), envelope)
    assert verdict.ticket_number is not None
    assert gateway.preparer.answered == 0  # nothing else in flight: no round trip
    verdicts = await asyncio.gather(*(
        gateway.pipeline.ingest(make_mail(subject=f"together {n}", body=GERMAN), envelope)
        for n in range(5)))
    assert len({v.ticket_number for v in verdicts}) == 5
    # The first of them found nothing else in flight; the others found it still there.
    assert 1 <= gateway.preparer.answered <= 4


async def test_a_reload_keeps_the_helper(make_gateway: Any, monkeypatch: pytest.MonkeyPatch,
                                         db_url: str) -> None:
    monkeypatch.setattr(pipeline_module, "HELPER_ABOVE_INFLIGHT", 0)
    gateway = await make_gateway()
    await _helper_ready(gateway.preparer)
    helper = gateway.preparer._process  # noqa: SLF001
    await gateway.reload(make_settings(db_url))
    assert gateway.pipeline.preparer is gateway.preparer
    reply = await send(gateway.inbound_port, make_mail(subject="after reload", body=GERMAN))
    assert reply.code == 250
    assert gateway.preparer.answered == 1
    assert gateway.preparer._process is helper  # noqa: SLF001


async def test_a_start_that_fails_part_way_leaves_no_helper(sqlite_url: str) -> None:
    from gateway.service import Gateway

    before = _helpers()
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    busy = blocker.sockets[0].getsockname()[1]
    gateway = Gateway(make_settings(sqlite_url))
    try:
        with pytest.raises(OSError):
            await gateway.start(port=busy)
        assert _helpers() - before  # the helper was on its way
        await gateway.abandon()
        assert _helpers() == before
    finally:
        blocker.close()


async def test_a_helper_starts_when_deskgate_is_pid_1(tmp_path: Path) -> None:
    """In a container deskgate may be pid 1: its helper's parent is then pid 1 as well."""
    unshare = shutil.which("unshare")
    if unshare is None:
        need_peer("unshare (util-linux)", "not on PATH")
    script = tmp_path / "pid1.py"
    script.write_text(
        "import asyncio, os\n"
        "from gateway.ingest.prep import Preparer\n"
        "async def main():\n"
        "    helper = Preparer('/a/{sha256}')\n"
        "    print('pid', os.getpid(), 'started', await helper.start(), flush=True)\n"
        "    await helper.stop()\n"
        "asyncio.run(main())\n")
    run = await asyncio.create_subprocess_exec(
        str(unshare), "--pid", "--fork", "--mount-proc", sys.executable, str(script), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await asyncio.wait_for(run.communicate(), 60)
    assert b"pid 1 started True" in out, out
