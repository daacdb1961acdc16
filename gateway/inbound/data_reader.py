"""The mail after DATA, read in chunks instead of line by line (issue 10).

aiosmtpd reads DATA with one `readuntil(b"\\r\\n")` per line and keeps a list of lines: ~1,300
awaits and objects for 100 KB, and for a 10 MB mail the loop spends milliseconds per wakeup
in that Python loop, so every other session waits (aiosmtpd issue 293). Here each wakeup takes
what the socket delivered up to the end marker in one piece, scanned by C code: line
lengths with `bytes.split`, dot-unstuffing with one `replace` at the end.

Never reads past the end marker, so a pipelining client's next command stays in the stream.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from enum import Enum

END = b"\r\n.\r\n"  # CRLF "." CRLF; the first CRLF ends the mail's last line
_PREFIXES = (END[:4], END[:3], END[:2], END[:1])  # longest first


class DataState(Enum):
    NOMINAL = "nominal"
    TOO_LONG = "too_long"  # a line over the limit: 500, after the whole mail is read
    TOO_MUCH = "too_much"  # over the size limit: 552, after the whole mail is read


class _Lines:
    """Longest line seen so far across chunks (RFC 5321 4.5.3.1.6), CRLF not counted."""

    __slots__ = ("cr", "current", "limit", "over")

    def __init__(self, limit: int) -> None:
        self.limit, self.current, self.over, self.cr = limit, 0, False, False

    def feed(self, chunk: bytes | bytearray) -> None:
        if self.over:
            return
        if self.cr and chunk.startswith(b"\n"):  # a CRLF split between two reads
            self.current, chunk = 0, chunk[1:]
        first = chunk.find(b"\r\n")
        if first >= 0:
            last = chunk.rfind(b"\r\n")
            if self.current + first > self.limit or (
                    last > first and self._long_line_within(chunk, first + 2, last)):
                self.over = True
                return
            self.current = len(chunk) - last - 2
        else:
            self.current += len(chunk)
        self.cr = chunk.endswith(b"\r")
        self.over = self.current - self.cr > self.limit

    def _long_line_within(self, chunk: bytes | bytearray, start: int, end: int) -> bool:
        """A line over the limit in chunk[start:end] (whole lines, CRLF-separated).

        Splitting a 10 MB mail into its lines made 135,000 objects (a fifth of the loop's
        time while big mails arrived). A line longer than 2 * step holds a whole window
        [i, i + step + 1) of the grid below without a CRLF, so where every window has one,
        no line is over the limit; only where one has none are the lines measured.
        """
        step = max(1, self.limit // 2)
        find = chunk.find
        for i in range(start, end, step):
            if find(b"\r\n", i, i + step + 1) < 0:
                return max(map(len, chunk[start:end].split(b"\r\n"))) > self.limit
        return False


def _pending_prefix(tail: bytes | bytearray) -> bytes:
    """The longest end of `tail` that starts the end marker (the marker may straddle reads)."""
    return next((p for p in _PREFIXES if tail.endswith(p)), b"")


async def read_data(reader: asyncio.StreamReader, size_limit: int | None,
                    line_limit: int) -> tuple[DataState, bytes]:
    """The mail's content, dot-unstuffed (RFC 5321 4.5.2), and whether it was within limits.

    Over a limit the rest is still read to the end marker (and dropped) so the session can
    answer and go on; the content is then empty. `line_limit` counts the CRLF, as aiosmtpd.
    """
    data = bytearray(b"\r\n")  # DATA's own CRLF: the marker may come at once (empty mail)
    tail = b"\r\n"
    received = 0
    state = DataState.NOMINAL
    lines = _Lines(line_limit - 2)
    while True:
        if prefix := _pending_prefix(tail):
            # Only a few bytes can complete the marker; never read beyond it.
            piece = await reader.readexactly(len(END) - len(prefix))
            ended = prefix + piece == END
        else:
            try:
                piece = await reader.readuntil(END)
            except asyncio.LimitOverrunError as exc:  # no marker in the buffer yet: take it
                piece = await reader.read(exc.consumed)
            ended = piece.endswith(END)
        received += len(piece)
        # Content is what came before the marker's "." CRLF (3 bytes), as aiosmtpd counts.
        if state is DataState.NOMINAL and size_limit and received - 3 > size_limit:
            state, data = DataState.TOO_MUCH, bytearray()
        if state is DataState.NOMINAL:
            data += piece
            lines.feed(piece)
            if lines.over:
                state, data = DataState.TOO_LONG, bytearray()
        if ended:
            break
        tail = (tail + piece)[-4:] if len(piece) < 4 else piece[-4:]
    if state is not DataState.NOMINAL:
        return state, b""
    del data[len(data) - 3:]  # the marker's "." CRLF; its CRLF ends the last line
    if len(data) > KERNEL_COPY_BYTES and hasattr(os, "memfd_create"):
        return state, await asyncio.to_thread(_unstuff, data, _copy_by_kernel)
    return state, _unstuff(data)


# How many dots _has_stuffed_line looks at one by one before one scan for "\r\n." instead.
DOT_PROBES = 64


def _has_stuffed_line(data: bytearray) -> bool:
    """Whether a line of data (which starts with CRLF) starts with a dot.

    A lone "." is found by memchr at memory speed; the search for "\r\n." steps through the
    mail a few bytes at a time (8 ms for 10 MB here, on the loop, per big mail). A big mail is
    mostly base64, which has no dots: its few header dots are checked one by one. Prose has
    a dot every line or so: past DOT_PROBES of them, the one search is cheaper.
    """
    find = data.find
    dot = find(b".")
    for _ in range(DOT_PROBES):
        if dot < 0:
            return False
        if dot >= 2 and data[dot - 2:dot] == b"\r\n":
            return True
        dot = find(b".", dot + 1)
    return b"\r\n." in data


# Over this, the mail's final copy is made by the kernel, in a thread (_copy_by_kernel).
KERNEL_COPY_BYTES = 1 << 20


def _copy(data: bytearray) -> bytes:
    raw = bytes(data)
    data.clear()
    return raw


def _copy_by_kernel(data: bytearray) -> bytes:
    """bytes(data), emptying data, with the copying done by write and read system calls.

    A buffer of a MiB or more is fresh memory here (gateway/memory.py), and bytes(data)
    faults its pages in one by one with the GIL held: 10 ms for 20 MiB on an idle machine,
    40-120 ms on a busy one (bench/run.py's big-mail phase), and no session moves meanwhile.
    The kernel copies into a memfd and back into a new bytes object with the GIL released,
    so this runs in a thread while the loop goes on. At most two copies exist at any time.
    """
    fd = os.memfd_create("deskgate-data", os.MFD_CLOEXEC)
    try:
        size = len(data)
        with memoryview(data) as view:
            written = 0
            while written < size:
                written += os.write(fd, view[written:])
        data.clear()
        raw = os.pread(fd, size, 0)
        if len(raw) < size:  # a short read: the rest in further reads
            pieces, got = [raw], len(raw)
            while got < size:
                pieces.append(os.pread(fd, size - got, got))
                got += len(pieces[-1])
            raw = b"".join(pieces)
        return raw
    finally:
        os.close(fd)


def _unstuff(data: bytearray, copy: Callable[[bytearray], bytes] = _copy) -> bytes:
    """Drop the leading dot of every line (RFC 5321 4.5.2; aiosmtpd drops any leading dot),
    then DATA's own CRLF; at most two copies of a big mail exist at any time."""
    if _has_stuffed_line(data):
        unstuffed = data.replace(b"\r\n.", b"\r\n")
        data.clear()
        data = unstuffed
    del data[:2]
    return copy(data)
