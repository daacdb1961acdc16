"""Big transient buffers go back to the operating system when freed, and the objects of
start-up stay out of the cyclic garbage collector's way (issue 10: memory and latency).

A 50 MB mail passes through several buffers of its size (the DATA read, the copy sent to the
parser process, SQLite's bound copy). glibc's malloc serves large blocks with mmap and gives
them back on free, but it raises that threshold each time such a block is freed (up to 32 MiB),
so the next big mail's buffers come from the heap, which is seldom returned: the process keeps
the high-water mark of several mails. A fixed threshold turns the dynamic raise off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys

import structlog

log = structlog.get_logger("deskgate.memory")

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20  # below this, small and medium objects stay on the heap


def return_big_buffers() -> bool:
    """Fix glibc's mmap threshold; False where there is no glibc (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    if not done:
        log.warning("memory.mallopt_failed")
    return done


def freeze_startup_objects() -> int:
    """Move every object alive after start-up out of the collector's generations.

    Imports, templates, the language model and the store's metadata leave ~125,000 tracked
    objects that live as long as the process. A full collection walks them all, each time
    the survivors of the young generations reach a quarter of them: every few seconds under
    load, 70-95 ms each on the loop, with mails waiting. Frozen, they are still freed by
    reference counting; only a cycle among them that became garbage later would stay, and
    the collection just before the freeze leaves none that is garbage already. Objects made
    afterwards (sessions, mails, batches) are collected as before, and what a SIGHUP reload
    replaces is freed by reference counting (tests/integration/test_frozen_startup.py).
    Returns how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("memory.frozen", objects=frozen)
    return frozen
