"""Acknowledgements: who gets one (pure policy) and the after-store hook that queues it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.ingest.addresses import BOUNCE_LOCAL, reply_address
from gateway.ingest.pipeline import StoredMail
from gateway.outbound import queue
from gateway.outbound.compose import Outgoing, compose
from gateway.outbound.config import AckSettings
from gateway.outbound.render import Renderer, content_languages, pick_language
from gateway.settings import Settings
from store import repo
from store.models import Message

log = structlog.get_logger("deskgate.ack")
Events = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class AckFacts:
    """What the decision needs, looked up before it is taken."""

    created: bool
    reopened: bool
    automated: bool
    recipient: str | None
    recent: int  # acknowledgements to this recipient in the last hour (all instances)


# RFC 3834 2: never answer these; they are robots, lists or the postmaster.
_ROBOT_LOCAL = re.compile(r"^(?:postmaster|post_master|mailer[-_]?daemon|no[-_]?reply|"
                          r"do[-_]?not[-_]?reply|listserv|majordomo|owner-.*|.*-request|"
                          r"bounces?(?:\+.*)?)$", re.I)


def is_robot(address: str) -> bool:
    return bool(_ROBOT_LOCAL.match(address.rpartition("@")[0]))


def is_ours(address: str, own_addresses: frozenset[str]) -> bool:
    local, _, domain = address.lower().rpartition("@")
    base = local.partition("+")[0]
    own_domains = {a.rsplit("@", 1)[1] for a in own_addresses}
    return f"{base}@{domain}" in own_addresses or domain in own_domains and base == BOUNCE_LOCAL


def decide_ack(facts: AckFacts, policy: AckSettings, own: frozenset[str]) -> str | None:
    """None when an acknowledgement goes out, else why not (DESIGN 4, Loops)."""
    if not policy.enabled:
        return "acknowledgements are disabled"
    if not (facts.created or facts.reopened and policy.on_reopen):
        return "not a new ticket"
    if facts.automated:
        return "automated mail is never acknowledged"
    if not facts.recipient:
        return "no address to answer"
    if is_ours(facts.recipient, own):
        return "the sender is one of our own addresses"
    if is_robot(facts.recipient):
        return "the sender is a robot address (RFC 3834 2)"
    if facts.recent >= policy.per_contact_per_hour:
        return f"{policy.per_contact_per_hour} acknowledgements to this contact in the last hour"
    return None


class AckHook:
    """Pipeline after-store hook: the ack's outbox row commits with the mail that caused it."""

    def __init__(self, settings: Settings, renderer: Renderer,
                 queued: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.renderer = renderer
        self.queued = queued  # nudges the worker; its poll is the guarantee
        self.departments = {d.slug: d for d in settings.departments}

    async def __call__(self, session: AsyncSession, stored: StoredMail) -> Events:
        if not (stored.created or stored.reopened):
            return []  # an ordinary reply: nothing to say, nothing to log
        if stored.envelope.history:  # an IMAP mailbox's past, imported with from = "all"
            return [("ack_suppressed", {"reason": "imported history"})]
        if stored.suppress_ack:  # an operator's rule said so (issue 13)
            log.info("ack.suppressed", ticket=stored.ticket_number, reason="rule")
            return [("ack_suppressed", {"reason": "suppressed by a rule"})]
        recipient = stored.reply_to or stored.contact
        facts = AckFacts(stored.created, stored.reopened, stored.classification.automated,
                         recipient, 0)
        policy, own = self.settings.outbound.acknowledgements, self.settings.own_addresses
        # The rate limit is decide_ack's last test: counted only when nothing else says no.
        reason = decide_ack(facts, policy, own)
        verified = False
        if reason is None:
            assert recipient is not None
            dept = self.departments[stored.department]
            recent, verified = await queue.recent_and_verified(
                session, "ack", recipient, stored.now - timedelta(hours=1), dept.addresses[0])
            reason = decide_ack(replace(facts, recent=recent), policy, own)
        if reason is not None:
            log.info("ack.suppressed", ticket=stored.ticket_number, reason=reason)
            return [("ack_suppressed", {"reason": reason})]
        assert recipient is not None
        return await self._queue(session, stored, recipient, verified)

    async def _queue(self, session: AsyncSession, stored: StoredMail, recipient: str,
                     verified: bool) -> Events:
        dept = self.departments[stored.department]
        language = pick_language(content_languages(stored.mail.header("content-language")),
                                 dept.language)
        tag = self.settings.tickets.tag_format.format(number=stored.ticket_number)
        rendered = self.renderer.render("ack", language, {
            "customer_name": stored.mail.from_name, "department": dept.name,
            "ticket_number": stored.ticket_number, "subject": stored.mail.subject, "tag": tag,
        }, department=dept.slug)
        secret = self.settings.tickets.reply_token_secret
        sender = dept.addresses[0]
        composed = compose(rendered, Outgoing(
            from_addr=sender, from_name=dept.name, to=recipient, hostname=self.settings.hostname,
            date=stored.now, tag=tag, reply_to=reply_address(sender, stored.ticket_number, secret),
            in_reply_to=stored.mail.message_id, references=stored.mail.references,
            language=language))
        # Recorded as a message of the ticket: a reply naming its Message-ID threads (DESIGN 4).
        await repo.insert_row(session, Message, dict(
            ticket_id=stored.ticket_id, direction="out", kind="ack",
            message_id=composed.message_id,
            in_reply_to=[stored.mail.message_id] if stored.mail.message_id else [],
            references=[], from_addr=sender, from_name=dept.name, reply_to=[], to=[recipient],
            cc=[], subject=composed.subject, received_at=stored.now, text=rendered.text,
            html=rendered.html, language=language, envelope_to=[recipient], channel="outbox",
            rule_hits=[], defects=[]))
        row = await queue.insert(session, kind="ack", from_addr=sender, to=recipient,
                                 message_id=composed.message_id, mime=composed.mime,
                                 now=stored.now, verified=verified,
                                 ticket_id=stored.ticket_id, cause_message_id=stored.message_pk)
        self.queued()
        log.info("ack.queued", ticket=stored.ticket_number, outbox=row.id, language=language,
                 state=row.state)
        return [("ack_queued", {"outbox": row.id, "language": language, "state": row.state,
                                "message_id": composed.message_id})]
