"""The fast MAIL/RCPT address parsing (gateway.inbound.smtp_address) answers exactly what
aiosmtpd's own `SMTP._getaddr` answers: for the plain shapes it short-cuts and for anything else.
(Also here: GatewaySMTP writes a multiline reply in one piece, with aiosmtpd's bytes.)"""

from __future__ import annotations

import asyncio
import os
import string
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Session
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.inbound import smtp_address
from gateway.inbound.smtp import GatewaySMTP
from gateway.inbound.smtp_address import getaddr, library_getaddr

EXAMPLES = int(os.environ.get("DESKGATE_FUZZ_EXAMPLES", "300"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None,
                    derandomize=os.environ.get("CI") == "true",
                    suppress_health_check=[HealthCheck.too_slow])

LIMITS = st.sampled_from([0, 0, 1, 4, 64])  # aiosmtpd's local_part_limit (0: none)

_ATEXT = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-"
_ATOM = st.text(_ATEXT, min_size=1, max_size=8)
_LABEL = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=8)
LOCAL = st.lists(_ATOM, min_size=1, max_size=3).map(".".join)
DOMAIN = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)
# What may follow ">": nothing, SMTP's space, and what the header parser treats specially.
SEP = st.sampled_from(["", " ", "  ", "\t", " \t ", "\xa0", " \xa0", "\u3000", "\x1c", "\r\n"])
PARAM = st.sampled_from(["SIZE=5120", "BODY=8BITMIME", "SMTPUTF8", "RET=HDRS", "X=", "(c)", "()",
                         "(a (b))", "(", ")", ">", "<x@y>", "é", "\udcff", "=?utf-8?q?x?="])
PARAMS = st.lists(PARAM, max_size=3).map(" ".join)
PLAIN = st.builds(lambda lp, d, sep, ps: f"<{lp}@{d}>{sep}{ps}", LOCAL, DOMAIN, SEP, PARAMS)

# Characters that change how the header parser reads an address, and some that do not.
TRICKY = list('"\\()<>@,:;.[] \t=?') + ["é", "ü", "中", "\udcff", "\x00", "\x7f", "\r", "\n",
                                        "\xa0", "\u3000", "\u2028", "a", "Z", "0"]
FRAGMENTS = ["<", ">", "<>", "@", ".", '"', "\\", "(", ")", "[", "]", ",", ":", " ", "\t",
             "=?", "?=", "a", "b.c", "x@y", "@a,@b:", "[1.2.3.4]", "SIZE=1", "é", "\udcff"]


def _mutated(base: str, edits: list[tuple[int, int, str]]) -> str:
    """`base` with characters inserted (kind 0), replaced (1) or deleted (2)."""
    for kind, at, char in edits:
        at %= len(base) + 1
        if kind == 0:
            base = base[:at] + char + base[at:]
        elif kind == 1:
            base = base[:at] + char + base[at + 1:]
        else:
            base = base[:at] + base[at + 1:]
    return base


NEAR_PLAIN = st.builds(_mutated, PLAIN, st.lists(st.tuples(st.integers(0, 2), st.integers(0, 80),
                                                           st.sampled_from(TRICKY)),
                                                 min_size=1, max_size=3))
PIECES = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=10).map("".join)
ANY_TEXT = st.text(st.sampled_from(TRICKY) | st.characters(), max_size=40)


def _outcome(parse: Callable[..., Any], *args: Any) -> Any:
    """What a parse returns, or the exception it raises (aiosmtpd's can raise IndexError)."""
    try:
        return parse(*args)
    except Exception as error:  # the same failure is part of the same behaviour
        return type(error), error.args


def _library(arg: str, limit: int) -> Any:
    return _outcome(SMTP._getaddr, SimpleNamespace(local_part_limit=limit), arg)


def _assert_same(arg: str, limit: int) -> None:
    expected = _library(arg, limit)
    assert _outcome(getaddr, arg, limit) == expected
    assert _outcome(library_getaddr, arg, limit) == expected


@PROPERTY
@given(PLAIN, LIMITS)
@example("<c12@customer.example>", 0)
@example("<a@b.c> SIZE=5120 BODY=8BITMIME", 0)
def test_plain_addresses_same_as_aiosmtpd(arg: str, limit: int) -> None:
    _assert_same(arg, limit)


@PROPERTY
@given(NEAR_PLAIN, LIMITS)
def test_almost_plain_addresses_same_as_aiosmtpd(arg: str, limit: int) -> None:
    _assert_same(arg, limit)


@PROPERTY
@given(PIECES | ANY_TEXT, LIMITS)
def test_any_argument_same_as_aiosmtpd(arg: str, limit: int) -> None:
    _assert_same(arg, limit)


@pytest.mark.parametrize(("arg", "limit", "expected"), [
    ("<c12@customer.example>", 0, ("c12@customer.example", "")),
    ("<a@b.c> SIZE=5120 BODY=8BITMIME", 0, ("a@b.c", "SIZE=5120 BODY=8BITMIME")),
    ("<a@b.c>\tSIZE=1", 0, ("a@b.c", "SIZE=1")),
    ("<a@b.c> \xa0SIZE=1", 0, ("a@b.c", "SIZE=1")),  # str.lstrip() after a space or tab
    ("<a@b.c>\xa0SIZE=1", 0, ("a@b.c", "\xa0SIZE=1")),  # ... but not on its own
    ("<a@b.c>>", 0, ("a@b.c", ">")),
    ("<a@b.c> (comment) SIZE=1", 0, ("a@b.c", "SIZE=1")),
    ("<>", 0, ("<>", "")),
    ("<> SIZE=1", 0, ("<>", " SIZE=1")),  # the null path keeps the space before its params
    ("", 0, ("", "")),
    ('<"a b"@c.d>', 0, ('"a b"@c.d', "")),
    ('<"ab"@c.d>', 0, ("ab@c.d", "")),
    ("<a b@c.d>", 0, ('"a b"@c.d', "")),
    ("<@a,@b:x@y>", 0, ("x@y", "")),  # source route dropped
    ("<a@b.c", 0, ("a@b.c", "")),  # missing ">"
    ("<josé@exämple.com> SMTPUTF8", 0, ("josé@exämple.com", "SMTPUTF8")),
    ("<=?utf-8?q?x?=@b.c>", 0, ("x@b.c", "")),  # an encoded word, decoded by the parser
    ("<a@[192.0.2.1]>", 0, ("a@[192.0.2.1]", "")),
    ("a@b.c SIZE=1", 0, ("a@b.c", "SIZE=1")),
    ("<a@b.c.>", 0, (None, None)),
    ("<a@b@c>", 0, (None, None)),
    ("<" + "a" * 64 + "@b.c>", 64, ("a" * 64 + "@b.c", "")),
    ("<" + "a" * 65 + "@b.c>", 64, (None, None)),
    ('<"' + "a" * 64 + '"@b.c>', 64, ("a" * 64 + "@b.c", "")),
    ("<", 0, (IndexError, ("string index out of range",))),  # aiosmtpd's own: kept
])
def test_examples(arg: str, limit: int, expected: Any) -> None:
    assert _library(arg, limit) == expected
    assert _outcome(getaddr, arg, limit) == expected


def test_plain_shapes_never_reach_the_header_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    def parser(*_: Any) -> Any:
        raise AssertionError("parsed")

    monkeypatch.setattr(smtp_address, "library_getaddr", parser)
    assert getaddr("<support@example.test>") == ("support@example.test", "")
    assert getaddr("<a.b+tag@x-y.example> SIZE=5120 BODY=8BITMIME") == (
        "a.b+tag@x-y.example", "SIZE=5120 BODY=8BITMIME")
    assert getaddr("<>") == ("<>", "")
    with pytest.raises(AssertionError, match="parsed"):
        getaddr('<"quoted"@example.test>')


def test_gateway_uses_the_fast_path_for_the_checked_aiosmtpd() -> None:
    """A new aiosmtpd's _getaddr must be compared again before ours stands in for it."""
    assert smtp_address.is_checked(SMTP._getaddr)
    assert GatewaySMTP._getaddr is not SMTP._getaddr
    server = SimpleNamespace(local_part_limit=4)
    assert GatewaySMTP._getaddr(server, "<abcd@e.f> SIZE=1") == ("abcd@e.f", "SIZE=1")
    assert GatewaySMTP._getaddr(server, "<abcde@e.f>") == (None, None)


@pytest.mark.parametrize("arg", ["<", '<"', "<@", '"'])
def test_what_aiosmtpds_parser_raises_on_is_malformed_for_the_gateway(arg: str) -> None:
    """Raised, it became 451 (try again later) for a path that will never parse."""
    assert _library(arg, 0)[0] is IndexError
    assert GatewaySMTP._getaddr(SimpleNamespace(local_part_limit=0), arg) == (None, None)


def test_another_getaddr_is_not_taken_for_the_checked_one() -> None:
    def _getaddr(self: Any, arg: str) -> tuple[str | None, str | None]:
        return None, None

    assert not smtp_address.is_checked(_getaddr)
    assert not smtp_address.is_checked(len)  # no source at all


class _Writer:
    """Records what a protocol writes (aiosmtpd's push: write, then drain)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    async def drain(self) -> None:
        return None


class _NoHooks:
    pass


async def _ehlo_writes(cls: type[SMTP], **options: Any) -> list[bytes]:
    server = cls(_NoHooks(), hostname="deskgate.test", loop=asyncio.get_running_loop(),
                 **options)
    server.session = Session(server.loop)
    server._writer = writer = _Writer()  # type: ignore[assignment]
    await server.smtp_EHLO("client.example")
    await server.push("250 2.1.0 OK")
    return writer.writes


@pytest.mark.parametrize("options", [
    {"enable_SMTPUTF8": True, "data_size_limit": 5_000_000},
    {"data_size_limit": None, "decode_data": True, "auth_require_tls": False},
])
async def test_multiline_reply_is_one_write_of_the_same_bytes(options: dict[str, Any]) -> None:
    library = await _ehlo_writes(SMTP, **options)
    ours = await _ehlo_writes(GatewaySMTP, **options)
    assert len(library) > 2 and library[-2].startswith(b"250 HELP")
    assert ours == [b"".join(library[:-1]), library[-1]]  # EHLO's lines at once, then MAIL's
