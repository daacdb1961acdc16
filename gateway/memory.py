"""Big transient buffers go back to the operating system when freed (issue 10: memory).

A 50 MB mail passes through several buffers of its size (the DATA read, the copy sent to the
parser process, SQLite's bound copy). glibc's malloc serves large blocks with mmap and gives
them back on free, but it raises that threshold each time such a block is freed (up to 32 MiB),
so the next big mail's buffers come from the heap, which is seldom returned: the process keeps
the high-water mark of several mails. A fixed threshold turns the dynamic raise off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
