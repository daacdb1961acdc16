"""Pure: rendered text + ticket facts -> the final MIME bytes we store and later send (DESIGN 3)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from gateway.outbound.render import Rendered


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


def compose(rendered: Rendered, out: Outgoing, message_id: str | None = None) -> Composed:
    message_id = message_id or new_message_id(out.hostname)
    subject = tagged_subject(rendered.subject, out.tag)
    msg = EmailMessage(policy=SMTP)
    msg["From"] = Address(out.from_name, addr_spec=out.from_addr)
    msg["To"] = out.to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(out.date)
    msg["Message-ID"] = f"<{message_id}>"
    if out.in_reply_to:
        msg["In-Reply-To"] = f"<{out.in_reply_to}>"
    references = [*out.references[-20:], *([out.in_reply_to] if out.in_reply_to else [])]
    if references:
        msg["References"] = " ".join(f"<{r}>" for r in dict.fromkeys(references))
    if out.reply_to:
        msg["Reply-To"] = Address(out.from_name, addr_spec=out.reply_to)
    # RFC 3834 5 and the Exchange equivalent: no robot should answer what we send (DESIGN 4).
    msg["Auto-Submitted"] = out.auto_submitted
    msg["X-Auto-Response-Suppress"] = "All"
    msg["Content-Language"] = out.language
    for name, value in out.extra_headers:
        msg[name] = value
    msg.set_content(rendered.text, cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", cte="quoted-printable")
    return Composed(message_id, subject, msg.as_bytes())
