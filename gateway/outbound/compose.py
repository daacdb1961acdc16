"""Pure: rendered text + ticket facts -> the final MIME bytes we store and later send (DESIGN 3)."""

from __future__ import annotations

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


def _header(value: str, name: str) -> str | Header:
    # RFC 2047 only when needed; the email package's default policy costs ~4x as much.
    return value if value.isascii() else Header(value, "utf-8", header_name=name)


def _part(text: str, subtype: str) -> MIMEText:
    return MIMEText(text, subtype, _UTF8_QP if not text.isascii() else "us-ascii")


def compose(rendered: Rendered, out: Outgoing, message_id: str | None = None) -> Composed:
    message_id = message_id or new_message_id(out.hostname)
    subject = tagged_subject(rendered.subject, out.tag)
    msg = MIMEMultipart("alternative", policy=compat32)
    msg["From"] = formataddr((out.from_name, out.from_addr), charset="utf-8")
    msg["To"] = out.to
    msg["Subject"] = _header(subject, "Subject")
    msg["Date"] = format_datetime(out.date)
    msg["Message-ID"] = f"<{message_id}>"
    if out.in_reply_to:
        msg["In-Reply-To"] = f"<{out.in_reply_to}>"
    references = [*out.references[-20:], *([out.in_reply_to] if out.in_reply_to else [])]
    if references:
        msg["References"] = " ".join(f"<{r}>" for r in dict.fromkeys(references))
    if out.reply_to:
        msg["Reply-To"] = formataddr((out.from_name, out.reply_to), charset="utf-8")
    # RFC 3834 5 and the Exchange equivalent: no robot should answer what we send (DESIGN 4).
    msg["Auto-Submitted"] = out.auto_submitted
    msg["X-Auto-Response-Suppress"] = "All"
    msg["Content-Language"] = out.language
    for name, value in out.extra_headers:
        msg[name] = _header(value, name)
    msg.attach(_part(rendered.text, "plain"))
    msg.attach(_part(rendered.html, "html"))
    # RFC 5322 2.3: CRLF on the wire; DKIM signs exactly these bytes.
    return Composed(message_id, subject, msg.as_bytes(policy=_WIRE))
