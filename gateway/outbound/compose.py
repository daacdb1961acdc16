"""Pure: rendered text + ticket facts -> the final MIME bytes we store and later send (DESIGN 3)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from email.charset import QP, Charset
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import format_datetime, formataddr

from gateway.outbound.render import Rendered

_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
_WIRE = compat32.clone(linesep="\r\n")
# Anything a reader may take for a line end (CR, LF, VT, FF, NEL, U+2028/9) or that has no
# place in a header (other C0 controls, DEL): names, subjects and addresses come from mail
# and configuration, and one of these would end our header early or start a new one.
_NOT_IN_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]+")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """Everything a mail needs besides its text; plain values, no database."""

    from_addr: str
    from_name: str
    to: str
    hostname: str  # right-hand side of our Message-IDs
    date: datetime
    tag: str = ""  # ticket tag, e.g. "[#1234]"; put in the subject when missing
    reply_to: str | None = None  # the ticket token address (DESIGN 4, threading step 2)
    in_reply_to: str | None = None  # customer's Message-ID, without angle brackets
    references: tuple[str, ...] = ()
    auto_submitted: str = "auto-replied"  # RFC 3834 5: auto-replied | auto-generated
    language: str = "en"
    extra_headers: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Composed:
    message_id: str  # without angle brackets
    subject: str
    mime: bytes


def new_message_id(hostname: str) -> str:
    return f"{secrets.token_hex(12)}@{hostname}"


def tagged_subject(subject: str, tag: str) -> str:
    return subject if not tag or tag in subject else f"{tag} {subject}"


def one_line(value: str) -> str:
    """A header value that stays one header: line breaks and control characters -> space."""
    return _NOT_IN_HEADER.sub(" ", value)


def _msg_id(value: str) -> str:
    return re.sub(r"[\s<>]", "", one_line(value))


def _header(value: str, name: str) -> str | Header:
    # RFC 2047 only when needed; the email package's default policy costs ~4x as much.
    # Text that looks like an encoded-word is encoded too, so readers show it literally.
    value = one_line(value)
    plain = value.isascii() and "=?" not in value
    return value if plain else Header(value, "utf-8", header_name=name)


def _address(name: str, addr: str) -> str:
    """name <addr>, the name quoted or RFC 2047 encoded as it needs."""
    name, addr = one_line(name), one_line(addr)
    if "=?" in name:  # a literal encoded-word in a name would be decoded by the reader
        return f"{Header(name, 'utf-8').encode()} <{addr}>"
    return formataddr((name, addr), charset="utf-8")


def _part(text: str, subtype: str) -> MIMEText:
    return MIMEText(text, subtype, _UTF8_QP if not text.isascii() else "us-ascii")


def compose(rendered: Rendered, out: Outgoing, message_id: str | None = None) -> Composed:
    message_id = message_id or new_message_id(out.hostname)
    subject = one_line(tagged_subject(rendered.subject, out.tag))
    msg = MIMEMultipart("alternative", policy=compat32)
    msg["From"] = _address(out.from_name, out.from_addr)
    msg["To"] = one_line(out.to)
    msg["Subject"] = _header(subject, "Subject")
    msg["Date"] = format_datetime(out.date)
    msg["Message-ID"] = f"<{message_id}>"
    in_reply_to = _msg_id(out.in_reply_to or "")
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to}>"
    references = [_msg_id(r) for r in out.references[-20:]] + [in_reply_to]
    if any(references):
        msg["References"] = " ".join(f"<{r}>" for r in dict.fromkeys(references) if r)
    if out.reply_to:
        msg["Reply-To"] = _address(out.from_name, out.reply_to)
    # RFC 3834 5 and the Exchange equivalent: no robot should answer what we send (DESIGN 4).
    msg["Auto-Submitted"] = one_line(out.auto_submitted)
    msg["X-Auto-Response-Suppress"] = "All"
    msg["Content-Language"] = one_line(out.language)
    for header, value in out.extra_headers:
        if not _HEADER_NAME.match(header):
            raise ValueError(f"not a header name: {header!r}")
        msg[header] = _header(value, header)
    msg.attach(_part(rendered.text, "plain"))
    msg.attach(_part(rendered.html, "html"))
    # RFC 5322 2.3: CRLF on the wire; DKIM signs exactly these bytes.
    return Composed(message_id, subject, msg.as_bytes(policy=_WIRE))
