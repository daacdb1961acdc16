"""A small mail's CPU work before its transaction (MIME parse, hash, readable view) in a
helper process, so the event loop spends its core on SMTP and the store (issue 10).

Under load these steps were a fifth of the loop's time (bench/README.md); the helper does
them on the second core for a pipe round trip and an unpickle, a few percent of the loop.
The results are the same functions' results, and anything that goes wrong with the helper
leaves the mail to this process, so a mail is never refused or lost because of it: when the
helper is not running, the mail is prepared on the loop as before; a mail that was with the
helper when it failed (it died, raised, or gave no answer for ANSWER_TIMEOUT_S) may be what
failed it, so it is prepared in the big mails' parser pool, off the loop.

Frames both ways: 12 bytes (payload length, request id, big-endian), then the payload: the
raw mail one way, a pickle of `Prepared` back (an empty payload: "could not, do it
yourself"). The helper answers in order, one at a time. Its greeting carries a fingerprint
of the code it loaded: after an upgrade on disk a restarted helper could unpickle into
this process's older classes field by field in the wrong places, so a mismatch is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import hashlib
import os
import pickle
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.ingest.model import AttachmentPart, ParsedMail
from gateway.ingest.offload import in_process
from gateway.ingest.parse import parse
from gateway.ingest.readable import Readable, readable_or_plain, stored_attachments

log = structlog.get_logger("deskgate.ingest")

_FRAME = struct.Struct(">IQ")
# No answer at all for this long while requests wait (a parse gone wrong, a frozen helper):
# the helper is killed and restarted. Time spent queued behind answered requests is progress.
ANSWER_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0  # the helper imports deskgate and loads the language model (~1 s)
# After the helper failed, this long without one, doubled for each failure in a row (up to
# RESTART_PAUSE_MAX_S): a helper that fails at once must not be respawned for every mail.
RESTART_PAUSE_S = 5.0
RESTART_PAUSE_MAX_S = 300.0


def _code_fingerprint() -> str:
    """The ingest code this process loaded, read once at import."""
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:32]


CODE = _code_fingerprint()


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

    def __init__(self, suspect: bool = False) -> None:
        super().__init__()
        self.suspect = suspect  # the mail was with the helper when it failed


class Preparer:
    """One helper process and the requests in flight to it."""

    def __init__(self, cid_url: str) -> None:
        self.cid_url = cid_url
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[Prepared]] = {}
        self._next_id = 0
        self._progress_at = 0.0  # the latest answer, or the write that ended an idle spell
        self._failed_at = float("-inf")
        self._failures = 0  # in a row, without an answer in between
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
            # -P and the path as ours: the helper imports the code this process runs, not a
            # `gateway` package in its working directory (/var/lib/deskgate is writable).
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "gateway.ingest.prep", self.cid_url, str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
            assert process.stdout is not None
            async with asyncio.timeout(START_TIMEOUT_S):
                length, _ = _FRAME.unpack(await process.stdout.readexactly(_FRAME.size))
                code = (await process.stdout.readexactly(length)).decode()
            if code != CODE:
                raise ValueError("its code differs from this process's: restart deskgate")
        except (OSError, EOFError, ValueError, RuntimeError) as exc:  # TimeoutError included
            self._failed_at = time.monotonic()
            self._failures += 1
            log.warning("ingest.helper_failed", reason=f"start: {type(exc).__name__}",
                        detail=str(exc)[:200] or None, pid=process and process.pid)
            if process is not None:
                self._kill(process)
            return False
        except BaseException:  # a stop while it started
            if process is not None:
                self._kill(process)
            raise
        self._process = process
        self._reader = asyncio.create_task(self._read(process), name="prep-reader")
        self._watcher = asyncio.create_task(self._watch(process), name="prep-watch")
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
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._fail_waiting()

    async def prepare(self, raw: bytes) -> Prepared:
        """The helper's answer; else prepared here, or in the parser pool if this mail may be
        what failed the helper."""
        try:
            return await self._ask(raw)
        except HelperGone as gone:
            if gone.suspect:
                return await in_process(functools.partial(prepare, cid_url=self.cid_url), raw)
            return prepare(raw, self.cid_url)

    async def _ask(self, raw: bytes) -> Prepared:
        process = self._process
        if process is None or process.returncode is not None:
            self._restart_later()
            raise HelperGone
        self._next_id += 1
        request = self._next_id
        answer: asyncio.Future[Prepared] = asyncio.get_running_loop().create_future()
        if not self._waiting:
            self._progress_at = time.monotonic()  # the helper was idle until now
        self._waiting[request] = answer
        try:
            assert process.stdin is not None
            process.stdin.write(_FRAME.pack(len(raw), request) + raw)
            if process.stdin.transport.get_write_buffer_size():
                # The pipe is full: a helper that reads nothing more is killed by _watch,
                # which ends this wait with the pipe's loss.
                await process.stdin.drain()
            prepared = await answer  # HelperGone(suspect=True) when the helper failed
        except (OSError, RuntimeError) as exc:  # the pipe broke
            self._failed(process, f"write: {type(exc).__name__}")
            raise HelperGone(suspect=True) from exc
        finally:
            self._waiting.pop(request, None)
        self.answered += 1
        return prepared

    async def _watch(self, process: asyncio.subprocess.Process) -> None:
        """Kill a helper that answers nothing for ANSWER_TIMEOUT_S while requests wait; a
        request queued behind answered ones is not late, the helper is working."""
        while process is self._process:
            await asyncio.sleep(ANSWER_TIMEOUT_S / 4)
            if self._waiting and time.monotonic() - self._progress_at >= ANSWER_TIMEOUT_S:
                self._failed(process, "no answer in time")

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        try:
            while True:
                length, request = _FRAME.unpack(await process.stdout.readexactly(_FRAME.size))
                data = await process.stdout.readexactly(length)
                self._progress_at = time.monotonic()
                answer = self._waiting.get(request)
                if answer is None or answer.done():
                    continue  # its caller went away (session dropped)
                if not data:  # the helper could not: its traceback is on stderr
                    answer.set_exception(HelperGone(suspect=True))
                    continue
                answer.set_result(pickle.loads(data))  # noqa: S301 — our own helper
                self._failures = 0
        except Exception as exc:  # noqa: BLE001 — whatever it is, the helper is no use now
            self._failed(process, f"read: {type(exc).__name__}")

    def _failed(self, process: asyncio.subprocess.Process, reason: str) -> None:
        """Log once, kill the helper, hand its waiting requests back to their callers; about
        a helper already replaced or stopped, nothing."""
        if process is not self._process:
            return
        self._process = None
        self._failed_at = time.monotonic()
        self._failures += 1
        log.warning("ingest.helper_failed", reason=reason, pid=process.pid,
                    returncode=process.returncode, waiting=len(self._waiting))
        self._kill(process)
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(HelperGone(suspect=True))
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
        pause = min(RESTART_PAUSE_MAX_S, RESTART_PAUSE_S * 2 ** max(0, self._failures - 1))
        if time.monotonic() - self._failed_at < pause:
            return
        self._failed_at = time.monotonic()
        self._starting = asyncio.create_task(self.start(), name="prep-start")


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the serving process dies (Linux prctl PR_SET_PDEATHSIG): a helper stuck
    in a parse would otherwise never read the end of its input."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl (deskgate may be pid 1 itself)
        os._exit(1)


def _serve(cid_url: str, parent: int) -> None:
    """The helper: frames in on stdin, answers out on the original stdout; anything else
    written to stdout (a stray print, a log line) goes to stderr instead."""
    from gateway.ingest.readable import _classify  # noqa: PLC0415
    _die_with_parent(parent)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    # A stop (Ctrl-C, a SIGTERM or SIGHUP to the whole group) is the serving process's to
    # handle: it drains, and closes our stdin when done.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    source = sys.stdin.buffer
    _classify()  # the language model, before the greeting says we are ready
    gc.freeze()  # the model and modules live as long as the helper
    out.write(_FRAME.pack(len(CODE), 0) + CODE.encode())
    out.flush()
    while True:
        header = source.read(_FRAME.size)
        if len(header) < _FRAME.size:
            return  # EOF: the serving process is done with us
        length, request = _FRAME.unpack(header)
        raw = source.read(length)
        if len(raw) < length:
            return
        try:
            data = pickle.dumps(prepare(raw, cid_url), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 — this mail goes back; the next one is served
            import traceback  # noqa: PLC0415
            traceback.print_exc()
            data = b""
        out.write(_FRAME.pack(len(data), request) + data)
        out.flush()


if __name__ == "__main__":
    # Through the module's importable name, so the answers pickle as gateway.ingest.prep's
    # classes, not __main__'s.
    from gateway.ingest import prep  # noqa: PLW0406
    with contextlib.suppress(BrokenPipeError):
        prep._serve(sys.argv[1], int(sys.argv[2]))  # noqa: SLF001
