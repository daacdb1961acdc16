"""The address of a MAIL FROM / RCPT TO argument, as aiosmtpd 1.4's `SMTP._getaddr` gives it.

aiosmtpd parses it with email's header parser (and defines a typing.Protocol class per call):
~8 % of the loop under load. Nearly every client sends `<local@domain>` with a dot-atom local
part and a plain domain, for which that parser gives back the text between the brackets; a
regex answers those, everything else goes the library's way (tests/unit/test_smtp_address.py
compares both on generated arguments).
"""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

# sha256 of aiosmtpd 1.4.6's `SMTP._getaddr` source, the one `getaddr` was checked against.
_CHECKED_SOURCE = "0aeb21c56ac1260e784e430a340459c83c23640a85965e7b8de3e1ada74d85f5"

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"  # RFC 5322 atext, ASCII only
# "=?" would start an RFC 2047 encoded word, which the parser tries to decode.
_PLAIN = re.compile(rf"<((?!=\?){_ATEXT}(?:\.{_ATEXT})*)@([A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*)>")


def getaddr(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """(address, rest) or (None, None) when malformed; ("", "") for no argument."""
    if not arg:
        return "", ""
    if arg[0] == "<":
        if arg.startswith("<>"):  # the parser returns what follows as it is, spaces too
            return "<>", arg[2:]
        plain = _PLAIN.match(arg)
        if plain is not None:
            rest = arg[plain.end():]
            if rest[:1] in (" ", "\t"):  # the parser's folding whitespace: str.lstrip()
                rest = rest.lstrip()
            if rest[:1] != "(":  # a comment after ">" is the parser's to read
                if local_part_limit and len(plain.group(1)) > local_part_limit:
                    return None, None
                return arg[1:plain.end() - 1], rest
    return library_getaddr(arg, local_part_limit)


def library_getaddr(arg: str, local_part_limit: int = 0) -> tuple[str | None, str | None]:
    """aiosmtpd 1.4's `SMTP._getaddr`, less the class it defines on every call."""
    if not arg:
        return "", ""
    try:
        if arg.lstrip().startswith("<"):
            address, rest = get_angle_addr(arg)
        else:
            address, rest = get_addr_spec(arg)
    except HeaderParseError:
        return None, None
    addr = address.addr_spec
    localpart, _, _ = addr.rpartition("@")
    if local_part_limit and len(localpart) > local_part_limit:
        return None, None
    return addr, rest


def is_checked(method: Callable[..., object]) -> bool:
    """Whether aiosmtpd's `_getaddr` is the one we match: another version keeps its own."""
    try:
        source = inspect.getsource(method)
    except (OSError, TypeError):  # no source shipped: nothing to compare with
        return False
    return hashlib.sha256(source.encode()).hexdigest() == _CHECKED_SOURCE
