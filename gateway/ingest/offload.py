"""Parsing of big mails in a separate process: a thread would still hold the GIL for most of
a parse (the email package is pure Python), and every other session on the event loop would
wait for it (issue 10: small mails stalled for seconds while big ones arrived)."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

import structlog

from gateway.memory import return_big_buffers

log = structlog.get_logger("deskgate.ingest")
T = TypeVar("T")

# Over this size a mail's CPU-heavy steps (parse, hash, DKIM canonicalization) run in the
# parser process: in a thread they would hold the GIL long enough to stall every session.
BIG_MAIL_BYTES = 256 * 1024

_pool: ProcessPoolExecutor | None = None
_owner = 0  # the pid that made the pool: a forked worker process makes its own


def _executor() -> ProcessPoolExecutor:
    global _pool, _owner
    if _pool is None or _owner != os.getpid():
        # spawn, not fork: this process has threads (aiosqlite's, asyncio's) whose locks a
        # forked child could inherit held. One process less than the cores: the loop keeps one.
        workers = max(1, (os.cpu_count() or 2) - 1)
        _pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=_parser_process_init)
        _owner = os.getpid()
    return _pool


# How much lower the parser process runs than the serving one: a big mail's parse is bulk
# work that may wait; the small mails the loop answers meanwhile should not (issue 10).
PARSER_NICENESS = 10


def _parser_process_init() -> None:
    return_big_buffers()
    try:
        os.nice(PARSER_NICENESS)
    except OSError:  # not permitted here: it parses at the serving process's priority
        pass


def _nothing() -> None:
    return None


async def in_process(function: Callable[[bytes], T], raw: bytes) -> T:
    """function(raw) in the parser process; in a thread if that process cannot be had."""
    global _pool
    try:
        executor = _executor()
        pending = asyncio.get_running_loop().run_in_executor(executor, function, raw)
        # The pool's feeder thread keeps the last item it pickled (a copy of the whole mail)
        # until it pickles the next: a tiny one right behind lets that copy go at once.
        executor.submit(_nothing)
        return await pending
    except (BrokenProcessPool, OSError, RuntimeError) as exc:
        # The child died (OOM killer) or cannot start: the mail must still be taken.
        log.warning("ingest.parser_process_failed", error=type(exc).__name__)
        _pool = None
        return await asyncio.to_thread(function, raw)
