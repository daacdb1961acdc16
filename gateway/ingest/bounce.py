"""Reading delivery-status notifications: who bounced, why, and whether for good (RFC 3464)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.ingest.model import ParsedMail

_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
# "deliverable" is not in RFC 3464 but some MTAs write it for a NOTIFY=SUCCESS answer.
_SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded", "deliverable"})
_NEWLINE = re.compile(r"\r\n?")
_FOLD = re.compile(r"\n[ \t]+")
_BLOCKS = re.compile(r"\n[ \t]*\n")
_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)$", re.M)
# Free-text bounces: an RFC 3463 enhanced status code, else a bare SMTP reply code.
_STATUS_TEXT = re.compile(r"(?<![\d.])([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
_SMTP_CODE_TEXT = re.compile(r"(?m)(?:^|\s)([45][0-5]\d)[ -](?=\S)")
_ANGLE_ADDR = re.compile(r"<([^<>\s@]+@[^<>\s@]+\.[^<>\s@]+)>")


@dataclass(frozen=True, slots=True)
class BounceReport:
    status: str | None  # RFC 3463 enhanced code such as "5.1.1", or an SMTP code from text
    action: str | None  # RFC 3464 2.3.3: failed | delayed | delivered | relayed | expanded
    final_recipients: tuple[str, ...]
    diagnostic: str | None
    permanent: bool


def _fields(block: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in _FIELD.findall(_FOLD.sub(" ", block)):
        found.setdefault(name.lower(), value.strip())
    return found


def _typed_value(value: str) -> str:
    """'rfc822; user@example.com' -> 'user@example.com' (RFC 3464 2.1.2 address-type)."""
    return value.split(";", 1)[1].strip() if ";" in value else value.strip()


def recipient_fields(mail: ParsedMail) -> list[dict[str, str]]:
    """Per-recipient field groups of every delivery-status part (RFC 3464 2.3)."""
    groups: list[dict[str, str]] = []
    for part in mail.attachments:
        if part.content_type not in _DSN_TYPES:
            continue
        text = _NEWLINE.sub("\n", part.payload.decode("utf-8", "replace"))
        blocks = [_fields(block) for block in _BLOCKS.split(text) if block.strip()]
        # The first block is per-message (Reporting-MTA); recipient blocks carry Action/Status.
        groups.extend(b for b in blocks if "action" in b or "final-recipient" in b)
    return groups


def dsn_actions(mail: ParsedMail) -> tuple[str, ...]:
    return tuple(g.get("action", "").lower() for g in recipient_fields(mail))


def is_success_only(mail: ParsedMail) -> bool:
    """A DSN that reports only delivery (RFC 3464 2.3.3), e.g. a NOTIFY=SUCCESS answer."""
    actions = dsn_actions(mail)
    return bool(actions) and all(a in _SUCCESS_ACTIONS for a in actions)


def _from_dsn(groups: list[dict[str, str]]) -> BounceReport:
    chosen = next((g for g in groups if g.get("action", "").lower() == "failed"), groups[0])
    status = chosen.get("status") or None
    action = chosen.get("action", "").lower() or None
    recipients = tuple(_typed_value(g["final-recipient"]) for g in groups
                       if g.get("final-recipient") and
                       g.get("action", "").lower() not in _SUCCESS_ACTIONS)
    diagnostic = _typed_value(chosen["diagnostic-code"]) if chosen.get("diagnostic-code") else None
    permanent = action == "failed" or bool(status and status.startswith("5"))
    return BounceReport(status, action, recipients, diagnostic, permanent)


def _from_text(text: str) -> BounceReport | None:
    head = text[:20000]
    match = _STATUS_TEXT.search(head) or _SMTP_CODE_TEXT.search(head)
    recipients = tuple(dict.fromkeys(_ANGLE_ADDR.findall(head[:4000])))
    if match is None and not recipients:
        return None
    status = match.group(1) if match else None
    permanent = bool(status and status.startswith("5"))
    return BounceReport(status, "failed" if permanent else None, recipients, None, permanent)


def analyse_bounce(mail: ParsedMail, raw: bytes | None = None) -> BounceReport | None:
    """What a bounce says; DSN fields first, else a best guess from the free text."""
    groups = recipient_fields(mail)
    if groups:
        return _from_dsn(groups)
    text = mail.text
    if not text.strip() and raw is not None:
        text = raw.decode("latin-1")
    return _from_text(text)
