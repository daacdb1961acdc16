"""Who sent it and which ticket it belongs to (DESIGN 4 threading order); pure."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from email_validator import EmailNotValidError, validate_email

from gateway.ingest.model import ParsedMail


@dataclass(frozen=True, slots=True)
class TicketRef:
    """What threading and the lifecycle need to know of an existing ticket."""

    id: int
    number: int
    department: str  # slug
    status: str
    closed_at: datetime | None


@dataclass(frozen=True, slots=True)
class ThreadEvidence:
    """Facts looked up in the store before deciding; gathered by the pipeline."""

    by_message_id: Mapping[str, TicketRef]  # ids from In-Reply-To/References we stored
    by_token: TicketRef | None  # ticket named by a valid reply token
    by_tag: TicketRef | None  # ticket named by the subject tag
    sender_in_tag_ticket: bool  # sender already took part in the tagged ticket
    # Of by_message_id, the ids of mail we sent: only those thread a mail that failed
    # authentication (a customer's Message-ID is no secret; ours reach only the recipient).
    sent_by_us: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ThreadDecision:
    ticket: TicketRef | None  # None: a new ticket
    step: str  # message-id | reply-token | subject-tag | new
    detail: str


@lru_cache(maxsize=4096)
def normalize_address(address: str | None) -> str | None:
    """Syntax-checked, lower-cased address (no DNS); None when it is not an address."""
    if not address:
        return None
    candidate = address.strip().strip("<>")
    try:
        result = validate_email(candidate, check_deliverability=False, allow_smtputf8=True,
                                allow_quoted_local=True, allow_domain_literal=True,
                                test_environment=True, globally_deliverable=False)
    except EmailNotValidError:
        return None
    return result.normalized.lower()


_RESULT = re.compile(r"\b(dmarc|dkim|spf)\s*=\s*([a-z]+)", re.IGNORECASE)


def auth_verdict(dmarc: str | None, spf: str | None, aligned_pass: bool,
                 spf_checked: bool = True) -> bool | None:
    """The authentication policy (DESIGN 4 Authenticity): False may not thread by tag.

    DMARC decides when the From domain publishes it; without DMARC a hard SPF fail with no
    aligned DKIM pass is a forgery; unknown (no record, temperror) is None, as most small
    senders publish nothing. A DMARC fail we could only judge without SPF (no client IP of
    the sender's: IMAP, pipe, an untrusted forwarder's header missing) stays unknown.
    """
    if dmarc == "pass":
        return True
    if dmarc == "fail":
        return False if spf_checked else None
    if aligned_pass:
        return True
    if dmarc in ("none", "permerror", None) and spf == "fail":
        return False
    return None


def sender_authenticated(mail: ParsedMail, trusted_authserv_ids: tuple[str, ...]) -> bool | None:
    """Verdict of the topmost Authentication-Results from one of these authserv-ids (RFC 8601),
    without alignment data (dkim/spf pass count as aligned). The pipeline uses authcheck."""
    trusted = {t.lower() for t in trusted_authserv_ids}
    for value in mail.header_all("authentication-results"):
        authserv_id = value.split(";", 1)[0].strip().split()[0].lower() if value.strip() else ""
        if authserv_id not in trusted:
            continue
        results = {m.group(1).lower(): m.group(2).lower() for m in _RESULT.finditer(value)}
        return auth_verdict(results.get("dmarc"), results.get("spf"),
                            "pass" in (results.get("dkim"), results.get("spf")))
    return None


def thread(mail: ParsedMail, evidence: ThreadEvidence, authenticated: bool | None
           ) -> ThreadDecision:
    # 1. The newest reference first: In-Reply-To, then References from the end (RFC 5322 3.6.4).
    for message_id in (*mail.in_reply_to, *reversed(mail.references)):
        ref = evidence.by_message_id.get(message_id)
        if ref is not None and (authenticated is not False or message_id in evidence.sent_by_us):
            return ThreadDecision(ref, "message-id", message_id)
    # 2. Our HMAC reply token: unguessable, so it holds even for unauthenticated mail.
    if evidence.by_token is not None:
        return ThreadDecision(evidence.by_token, "reply-token", f"#{evidence.by_token.number}")
    # 3. The subject tag, only from a known participant whose mail did not fail authentication.
    tagged = evidence.by_tag
    if tagged is not None:
        if authenticated is False:
            return ThreadDecision(None, "new",
                                  f"tag #{tagged.number} ignored: authentication failed")
        if evidence.sender_in_tag_ticket:
            return ThreadDecision(tagged, "subject-tag", f"#{tagged.number}")
        return ThreadDecision(None, "new",
                              f"tag #{tagged.number} ignored: sender not a participant")
    return ThreadDecision(None, "new", "no reference, token or tag")
