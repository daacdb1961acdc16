"""Plain values that flow through the ingest pipeline; no I/O, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP transaction (or pipe/IMAP caller) told us, not what the headers say."""

    mail_from: str | None  # "" for the null reverse-path <>; None: the caller cannot tell
    rcpt_tos: tuple[str, ...]
    peer: str = ""
    channel: str = "smtp"  # smtp | pipe | imap | reprocess
    helo: str = ""  # the client's HELO/EHLO name (SPF checks it for the null sender)
    # An IMAP first import with from = "all" (issue 7): stored as the mailbox's history, so
    # the after-store hooks send no acknowledgement and no notification.
    history: bool = False


@dataclass(frozen=True, slots=True)
class AttachmentPart:
    filename: str | None
    content_type: str
    payload: bytes  # transfer-decoded bytes
    inline: bool
    content_id: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedMail:
    """What parse() could make of the raw bytes; every field has a safe empty value."""

    message_id: str | None  # without angle brackets
    in_reply_to: tuple[str, ...]  # message-ids without angle brackets
    references: tuple[str, ...]
    from_addr: str | None  # addr-spec as written in From:, None when unusable
    from_name: str
    reply_to: tuple[str, ...]
    to: tuple[str, ...]
    cc: tuple[str, ...]
    subject: str  # decoded (RFC 2047), unfolded
    date: datetime | None  # timezone-aware when the header had a zone
    date_raw: str
    headers: tuple[tuple[str, str], ...]  # (lower-cased name, decoded value) in order
    text: str
    html: str | None
    attachments: tuple[AttachmentPart, ...]
    defects: tuple[str, ...]
    body_sha256: str  # sha256 hex of the bytes after the header section
    fatal: str | None = None  # set when the bytes cannot be made sense of as a mail

    def header(self, name: str) -> str | None:
        """First value of a header, or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key == name]


class MailKind(StrEnum):
    CUSTOMER = "customer"
    AUTO_REPLY = "auto_reply"
    BOUNCE = "bounce"
    REPORT = "report"  # ARF feedback reports, read receipts (MDN)
    BULK = "bulk"  # lists, newsletters, Precedence: bulk
    OWN_MAIL = "own_mail"  # comes from one of our own addresses: a loop


@dataclass(frozen=True, slots=True)
class RuleHit:
    rule: str  # kebab-case rule name, e.g. "auto-submitted-header"
    reason: str  # human-readable: what was seen


@dataclass(frozen=True, slots=True)
class Classification:
    kind: MailKind
    hits: tuple[RuleHit, ...] = field(default=())

    @property
    def automated(self) -> bool:
        """Never acknowledge automated mail (DESIGN 4, Loops)."""
        return self.kind is not MailKind.CUSTOMER or bool(self.hits)
