"""A small mail's CPU work before its transaction (MIME parse, hash, readable view) in a
helper process, so the event loop spends its core on SMTP and the store (issue 10).

Under load these steps were a third of the loop's time (bench/README.md); the helper does
them on the second core for a pipe round trip and an unpickle, ~50 us of the loop's time
against ~300 us. The results are the same functions' results: anything that goes wrong with
the helper (it cannot start, dies, answers late) makes the mail take the in-process path,
so a mail is never refused or lost because of it.

Frames both ways: 12 bytes (payload length, request id, big-endian), then the payload: the
raw mail one way, a pickle of `Prepared` back. The helper answers in order, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import pickle
import signal
import struct
import sys
import time
from dataclasses import dataclass

import structlog

from gateway.ingest.model import AttachmentPart, ParsedMail
from gateway.ingest.parse import parse
from gateway.ingest.readable import Readable, readable_or_plain, stored_attachments

log = structlog.get_logger("deskgate.ingest")

_FRAME = struct.Struct(">IQ")
# A parse that takes longer than this has gone wrong (the in-process path would stall every
# session as long): the helper is restarted and the mail parsed here.
ANSWER_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0  # the helper imports deskgate and loads the language model (~1 s)
# After the helper failed, this long without one: a helper that dies at once on start must
# not be respawned for every mail.
RESTART_PAUSE_S = 5.0


@dataclass(frozen=True, slots=True)
class Prepared:
    """What the transaction needs of a mail's bytes, computed before it begins."""

    mail: ParsedMail | None
    sha256: str
    failure: str | None  # why parse() failed, when it raised (the mail is quarantined)
    view: Readable | None = None
    attachments: tuple[AttachmentPart, ...] = ()


def parse_and_hash(raw: bytes) -> tuple[ParsedMail | None, str, str | None]:
    sha = hashlib.sha256(raw).hexdigest()
    try:
        return parse(raw), sha, None
    except Exception as exc:  # noqa: BLE001 — parse must never raise; if it does, quarantine
        return None, sha, f"parser failed: {type(exc).__name__}"


def prepare(raw: bytes, cid_url: str) -> Prepared:
    """The work itself: the same in the helper and in this process."""
    mail, sha, failure = parse_and_hash(raw)
    if mail is None or mail.fatal:
        return Prepared(mail, sha, failure)
    return Prepared(mail, sha, None, readable_or_plain(mail, cid_url), stored_attachments(mail))


class HelperGone(Exception):
    """The helper cannot answer this request: prepare it in this process."""


class Preparer:
    """One helper process and the requests in flight to it."""

    def __init__(self, cid_url: str) -> None:
        self.cid_url = cid_url
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Prepared]] = {}
        self._next_id = 0
        self._failed_at = float("-inf")
        self._starting: asyncio.Task[bool] | None = None
        self._stopped = False
        self._reaping: set[asyncio.Future[int]] = set()
        self.answered = 0  # requests the helper answered (the rest were prepared here)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def launch(self) -> None:
        """Start the helper in the background; mails before it is ready are prepared here."""
        self._failed_at = float("-inf")
        self._restart_later()

    async def start(self) -> bool:
        """Start the helper and wait until it has loaded what it needs; False if it cannot."""
        process = None
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway.ingest.prep", self.cid_url,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            assert process.stdout is not None
            async with asyncio.timeout(START_TIMEOUT_S):
                ready = await process.stdout.readexactly(_FRAME.size)
            if _FRAME.unpack(ready) != (0, 0):
                raise ValueError("unexpected greeting")
        except (OSError, EOFError, ValueError) as exc:  # TimeoutError and a missing file too
            self._failed_at = time.monotonic()
            log.warning("ingest.helper_failed", reason=f"start: {type(exc).__name__}",
                        pid=process and process.pid)
            if process is not None:
                self._kill(process)
            return False
        except BaseException:  # a stop while it started
            if process is not None:
                self._kill(process)
            raise
        self._process = process
        self._reader = asyncio.create_task(self._read(process), name="prep-reader")
        log.info("ingest.helper_ready", pid=process.pid)
        return True

    async def stop(self) -> None:
        self._stopped = True
        process, self._process = self._process, None
        if self._starting is not None:
            self._starting.cancel()
            await asyncio.gather(self._starting, return_exceptions=True)
        if process is not None:
            with contextlib.suppress(OSError, RuntimeError):
                assert process.stdin is not None
                process.stdin.close()  # the helper ends at EOF
            try:
                async with asyncio.timeout(5):
                    await process.wait()
            except TimeoutError:
                self._kill(process)
        if self._reaping:
            await asyncio.wait(self._reaping, timeout=5)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._fail_waiting()

    async def prepare(self, raw: bytes) -> Prepared:
        """The helper's answer; in this process when the helper cannot give one."""
        try:
            return await self._ask(raw)
        except HelperGone:
            return prepare(raw, self.cid_url)

    async def _ask(self, raw: bytes) -> Prepared:
        process = self._process
        if process is None or process.returncode is not None:
            self._restart_later()
            raise HelperGone
        self._next_id += 1
        request = self._next_id
        answer: asyncio.Future[Prepared] = asyncio.get_running_loop().create_future()
        self._waiting[request] = answer
        try:
            assert process.stdin is not None
            process.stdin.write(_FRAME.pack(len(raw), request) + raw)
            await process.stdin.drain()
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                prepared = await answer
            self.answered += 1
            return prepared
        except TimeoutError as exc:  # before OSError, of which it is a subclass
            self._failed("no answer in time")
            raise HelperGone from exc
        except (OSError, RuntimeError) as exc:  # the pipe broke: the helper is gone
            self._failed(f"write: {type(exc).__name__}")
            raise HelperGone from exc
        finally:
            self._waiting.pop(request, None)

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        try:
            while True:
                length, request = _FRAME.unpack(await process.stdout.readexactly(_FRAME.size))
                prepared = pickle.loads(await process.stdout.readexactly(length))  # noqa: S301 — our own helper
                answer = self._waiting.get(request)
                if answer is not None and not answer.done():
                    answer.set_result(prepared)
        except Exception as exc:  # noqa: BLE001 — whatever it is, the helper is no use now
            if self._process is process:
                self._failed(f"read: {type(exc).__name__}")

    def _failed(self, reason: str) -> None:
        """Log once, kill the helper, hand its waiting requests back to their callers."""
        process, self._process = self._process, None
        self._failed_at = time.monotonic()
        if process is not None:
            log.warning("ingest.helper_failed", reason=reason, pid=process.pid,
                        returncode=process.returncode)
            self._kill(process)
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(HelperGone())
        self._waiting.clear()

    def _kill(self, process: asyncio.subprocess.Process) -> None:
        """Kill, and wait for its exit in the background (else a zombie, and its pipes open)."""
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        reap = asyncio.ensure_future(process.wait())
        self._reaping.add(reap)
        reap.add_done_callback(self._reaping.discard)

    def _restart_later(self) -> None:
        if self._stopped or self._starting is not None and not self._starting.done():
            return
        if time.monotonic() - self._failed_at < RESTART_PAUSE_S:
            return
        self._failed_at = time.monotonic()
        self._starting = asyncio.create_task(self.start(), name="prep-start")




def _serve(cid_url: str) -> None:
    """The helper: frames in on stdin, answers out on the original stdout; anything else
    written to stdout (a stray print, a log line) goes to stderr instead."""
    from gateway.ingest.readable import _classify  # noqa: PLC0415
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    # A stop (Ctrl-C, systemd's SIGTERM to the whole group) is the serving process's to
    # handle: it drains, and closes our stdin when done; a killed parent closes it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    source = sys.stdin.buffer
    _classify()  # the language model, before the greeting says we are ready
    gc.freeze()  # the model and modules live as long as the helper
    out.write(_FRAME.pack(0, 0))
    while True:
        header = source.read(_FRAME.size)
        if len(header) < _FRAME.size:
            return  # EOF: the serving process is done with us
        length, request = _FRAME.unpack(header)
        raw = source.read(length)
        if len(raw) < length:
            return
        data = pickle.dumps(prepare(raw, cid_url), protocol=pickle.HIGHEST_PROTOCOL)
        out.write(_FRAME.pack(len(data), request) + data)


if __name__ == "__main__":
    # Through the module's importable name, so the answers pickle as gateway.ingest.prep's
    # classes, not __main__'s.
    from gateway.ingest import prep  # noqa: PLW0406
    with contextlib.suppress(BrokenPipeError):
        prep._serve(sys.argv[1])  # noqa: SLF001
