"""The chunked DATA reader gives what aiosmtpd's line-by-line reading gives (issue 10)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.inbound import data_reader
from gateway.inbound.data_reader import DataState, _Lines, read_data

LINE_LIMIT = 1001  # aiosmtpd's line_length_limit, CRLF included


def reference(stream: bytes, size_limit: int | None) -> tuple[DataState, bytes, bytes]:
    """aiosmtpd 1.4's smtp_DATA, line by line: (state, content, what stays unread)."""
    lines, rest, state, size = [], stream, DataState.NOMINAL, 0
    while True:
        end = rest.index(b"\r\n") + 2
        line, rest = rest[:end], rest[end:]
        if line == b".\r\n":
            break
        size += len(line)
        if len(line) > LINE_LIMIT and state is DataState.NOMINAL:
            state = DataState.TOO_LONG
        if size_limit and size > size_limit and state is DataState.NOMINAL:
            state = DataState.TOO_MUCH
        lines.append(line[1:] if line.startswith(b".") else line)
    content = b"".join(lines) if state is DataState.NOMINAL else b""
    return state, content, rest


async def chunked(stream: bytes, cuts: list[int], size_limit: int | None
                  ) -> tuple[DataState, bytes, bytes]:
    """Feed `stream` to a StreamReader in pieces (at `cuts`) while read_data reads it."""
    reader = asyncio.StreamReader(limit=LINE_LIMIT)

    async def feed() -> None:
        start = 0
        for cut in [*sorted(set(cuts)), len(stream)]:
            if cut > start:
                reader.feed_data(stream[start:cut])
                start = cut
                await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    state, content = await read_data(reader, size_limit, LINE_LIMIT)
    await feeder
    return state, content, await reader.read()


def run(stream: bytes, cuts: list[int], size_limit: int | None = None
        ) -> tuple[DataState, bytes, bytes]:
    return asyncio.run(chunked(stream, cuts, size_limit))


def test_a_plain_mail_with_a_pipelined_command_after_it() -> None:
    stream = b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    assert run(stream, []) == (DataState.NOMINAL, b"Subject: hi\r\n\r\nbody\r\n", b"QUIT\r\n")


def test_empty_mail_and_a_mail_of_one_empty_line() -> None:
    assert run(b".\r\nQUIT\r\n", []) == (DataState.NOMINAL, b"", b"QUIT\r\n")
    assert run(b"\r\n.\r\n", [1]) == (DataState.NOMINAL, b"\r\n", b"")


def test_dot_stuffing_is_undone_on_every_line_including_the_first() -> None:
    stream = b"..first\r\nmid\r\n..\r\n...x\r\n.y\r\n.\r\n"
    assert run(stream, [3, 9, 10, 11]) == (DataState.NOMINAL,
                                            b".first\r\nmid\r\n.\r\n..x\r\ny\r\n", b"")


def test_the_end_marker_split_across_every_possible_read() -> None:
    stream = b"a\r\nbb\r\n.\r\nNOOP\r\n"
    for cut in range(1, len(stream)):
        assert run(stream, [cut]) == (DataState.NOMINAL, b"a\r\nbb\r\n", b"NOOP\r\n"), cut


def test_a_big_mail_in_socket_sized_reads() -> None:
    body = b"".join(b"line %d with some words in it\r\n" % i for i in range(40_000))
    stream = b"Subject: big\r\n\r\n" + body + b".\r\n"
    state, content, rest = run(stream, list(range(0, len(stream), 65_536)))
    assert (state, rest) == (DataState.NOMINAL, b"")
    assert content == b"Subject: big\r\n\r\n" + body


def test_a_big_mail_is_copied_by_the_kernel_in_a_thread(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    # Over KERNEL_COPY_BYTES the final copy is made off the loop's thread, with the GIL
    # released; the content is the same, dot-unstuffing included.
    threads: list[int] = []
    real = data_reader._copy_by_kernel

    def spy(data: bytearray) -> bytes:
        threads.append(threading.get_ident())
        return real(data)

    monkeypatch.setattr(data_reader, "_copy_by_kernel", spy)
    body = b"".join(b"..line %d\r\n" % i for i in range(150_000))  # ~1.6 MB, every line stuffed
    stream = b"Subject: big\r\n\r\n" + body + b".\r\nQUIT\r\n"

    async def read() -> tuple[tuple[DataState, bytes, bytes], int]:
        return await chunked(stream, list(range(0, len(stream), 65_536)), None), \
            threading.get_ident()

    (state, content, rest), loop_thread = asyncio.run(read())
    assert (state, rest) == (DataState.NOMINAL, b"QUIT\r\n")
    assert content == b"Subject: big\r\n\r\n" + (b"\r\n" + body).replace(b"\r\n..", b"\r\n.")[2:]
    assert len(threads) == 1 and threads[0] != loop_thread
    small = run(b"Subject: small\r\n\r\nhi\r\n.\r\n", [])
    assert small[1] == b"Subject: small\r\n\r\nhi\r\n" and len(threads) == 1  # on the loop


def test_the_kernel_copy_takes_short_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: real_pread(fd, min(n, 1000), at))
    data = bytearray(bytes(range(256)) * 40)
    assert data_reader._copy_by_kernel(data) == bytes(range(256)) * 40
    assert data == bytearray()  # emptied: at most two copies of a mail at any time


def test_a_line_over_the_limit_answers_too_long_after_the_whole_mail() -> None:
    stream = b"Subject: x\r\nX-Long: " + b"a" * 5000 + b"\r\nbody\r\n.\r\nQUIT\r\n"
    assert run(stream, [100, 2000]) == (DataState.TOO_LONG, b"", b"QUIT\r\n")
    exactly = b"x" * (LINE_LIMIT - 2) + b"\r\n"  # 999 characters and CRLF: allowed
    assert run(exactly + b".\r\n", [LINE_LIMIT - 2]) == (DataState.NOMINAL, exactly, b"")


def test_over_the_size_limit_is_read_to_the_end_and_dropped() -> None:
    stream = b"0123456789\r\n" * 10 + b".\r\nQUIT\r\n"
    assert run(stream, [50], size_limit=100) == (DataState.TOO_MUCH, b"", b"QUIT\r\n")
    assert run(stream, [50], size_limit=120)[0] is DataState.NOMINAL  # exactly 120 bytes


_pieces = st.sampled_from([b"\r\n", b".", b"..", b"\r", b"\n", b"a", b"bc ", b".\r", b"\r\n.",
                           b"x" * 300, b"\xff\x00", b"QUIT"])


@settings(max_examples=400, deadline=None)
@given(body=st.lists(_pieces, max_size=40), cuts=st.lists(st.integers(0, 4000), max_size=6),
       size_limit=st.sampled_from([None, 50, 600]))
def test_same_as_aiosmtpd_for_any_mail_and_any_split(body: list[bytes], cuts: list[int],
                                                     size_limit: int | None) -> None:
    mail = b"".join(body)
    if not mail.endswith(b"\r\n"):
        mail += b"\r\n"
    stream = mail + b".\r\n" + b"RSET\r\n"  # a "." line inside the mail ends it earlier
    state, content, rest = run(stream, cuts, size_limit)
    expected_state, expected_content, expected_rest = reference(stream, size_limit)
    with pytest.MonkeyPatch.context() as patch:  # the kernel's copy gives the same
        patch.setattr(data_reader, "KERNEL_COPY_BYTES", 0)
        assert run(stream, cuts, size_limit) == (state, content, rest)
    assert (content, rest) == (expected_content, expected_rest)
    # Over both limits, which one is named may differ (per read here, per line there).
    assert (state is DataState.NOMINAL) == (expected_state is DataState.NOMINAL)


@settings(max_examples=400, deadline=None)
@given(body=st.lists(_pieces, max_size=60), cuts=st.lists(st.integers(0, 4000), max_size=8),
       limit=st.sampled_from([1, 2, 3, 7, 300, 999]))
def test_longest_line_tracking_is_exact_for_any_limit_and_split(body: list[bytes],
                                                                cuts: list[int],
                                                                limit: int) -> None:
    # The reader's window check stands in for measuring every line: whatever the limit and
    # wherever the reads split the mail, it says "over" exactly when some line is over.
    stream = b"".join(body)
    lines = _Lines(limit)
    start = 0
    for cut in [*sorted({min(c, len(stream)) for c in cuts}), len(stream)]:
        if cut > start:  # a read is never empty
            lines.feed(stream[start:cut])
            start = cut
    longest = max(map(len, stream.split(b"\r\n")), default=0)
    # The unfinished last line may end in a CR that the next read turns into its CRLF.
    unfinished = stream.rsplit(b"\r\n", 1)[-1]
    if unfinished.endswith(b"\r") and len(unfinished) == longest:
        longest -= 1
    assert lines.over == (longest > limit)


def test_a_stuffed_line_is_found_among_dots_that_are_not_at_a_line_start() -> None:
    # Dots inside lines are checked one by one up to DOT_PROBES, then one search takes over:
    # the line starting with a dot must be found on either side of that bound.
    for before in (0, 1, data_reader.DOT_PROBES - 1, data_reader.DOT_PROBES,
                   data_reader.DOT_PROBES + 5):
        mail = b"Subject: a.b\r\n\r\n" + b"x.y\r\n" * before + b"..z\r\nend.\r\n"
        state, content, _ = run(mail + b".\r\n", [7])
        assert (state, content) == (DataState.NOMINAL, mail.replace(b"\r\n..", b"\r\n.")), before
    assert not data_reader._has_stuffed_line(bytearray(b"\r\nno. dots. at. starts.\r\n"))
    assert data_reader._has_stuffed_line(bytearray(b"\r\n.first line\r\n"))


@settings(max_examples=300, deadline=None)
@given(body=st.lists(_pieces, max_size=40), probes=st.integers(0, 3))
def test_stuffed_lines_are_found_whatever_the_probe_bound(body: list[bytes], probes: int
                                                          ) -> None:
    data = bytearray(b"\r\n" + b"".join(body))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_reader, "DOT_PROBES", probes)
        assert data_reader._has_stuffed_line(data) == (b"\r\n." in data)
