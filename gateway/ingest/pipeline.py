"""ingest(raw, envelope) -> Verdict: the one path every received mail takes (DESIGN 2)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.errors import StoreUnavailable
from gateway.ingest.addresses import (
    Directory,
    Route,
    RouteKind,
    find_tag,
    route_recipient,
    tag_pattern,
)
from gateway.ingest.authcheck import AuthChecker, AuthOutcome
from gateway.ingest.identify import (
    ThreadDecision,
    ThreadEvidence,
    normalize_address,
    thread,
)
from gateway.ingest.model import AttachmentPart, Classification, Envelope, ParsedMail
from gateway.ingest.offload import BIG_MAIL_BYTES, in_process
from gateway.ingest.prep import Prepared, Preparer, parse_and_hash, prepare
from gateway.ingest.readable import (
    DEFAULT_CID_URL,
    Readable,
    readable_or_plain,
    stored_attachments,
)
from gateway.ingest.routing_rules import MailFacts, TicketPlan, evaluate, language_of, plan_ticket
from gateway.ingest.routing_rules import Outcome as RuleOutcome
from gateway.ingest.rules import classify
from gateway.settings import DepartmentSettings, Settings
from gateway.tickets.actions import apply_status
from gateway.tickets.assignment import pick_owner
from gateway.tickets.lifecycle import Action, Decision, decide
from gateway.tickets.sla import due_dates, is_open
from store import blobs, repo
from store.engine import CommitFailed, GroupCommit, Store
from store.models import Message, Quarantine, Ticket

log = structlog.get_logger("deskgate.ingest")
# A small mail goes to the helper process only while more mails than this are in ingest.
HELPER_ABOVE_INFLIGHT = 1


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    REJECTED = "rejected"  # no recipient of ours: nothing stored


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    ticket_number: int | None = None
    reason: str = ""
    rules: tuple[str, ...] = field(default=())


def fingerprint(mail: ParsedMail) -> str:
    """Same mail redelivered or forwarded twice -> same fingerprint (DESIGN 4, exactly once).

    With a Message-ID: that id plus From, Date and Subject, so two different mails that
    reuse an id are both kept. Without one: the body's hash stands in for the id.
    """
    key = mail.message_id if mail.message_id else f"body:{mail.body_sha256}"
    parts = (key, mail.from_addr or "", mail.date_raw, mail.subject)
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def _unavailable(bound: Any, exc: BaseException) -> StoreUnavailable:
    """Logged once with the reason; the SMTP side answers 451 4.3.0 without internals."""
    error = exc.strerror if isinstance(exc, OSError) else type(exc).__name__
    bound.error("ingest.store_unavailable", error=error)
    return StoreUnavailable(f"store unavailable: {error}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(slots=True)
class _Context:
    """Everything about one mail that the transaction needs, computed before it begins."""

    raw: bytes
    sha256: str
    envelope: Envelope
    mail: ParsedMail
    routes: list[Route]
    classification: Classification
    sender: str | None
    fingerprint: str
    authenticated: bool | None
    reply_to: str | None  # first usable Reply-To address, normalized
    auth_results: str | None = None  # our Authentication-Results value (authcheck)
    rules: RuleOutcome | None = None  # the operator's rules, for new tickets
    plan: TicketPlan | None = None  # what the new ticket became
    # Readable view: CPU-heavy (quote parsing, language guess), so made before the
    # transaction, outside SQLite's write lock (measured: bench/README.md).
    view: Readable | None = None
    # The parts to store (winmail.dat contents follow it, issue 12), decoded once, outside
    # the transaction.
    attachments: tuple[AttachmentPart, ...] = ()
    # A big mail's values committed in pieces already (_keep_in_parts): the raw bytes' count
    # of pieces, and each attachment's sha256 and count of pieces (0: over the attachment
    # limit, not kept) by its index in attachments, for attachments over a piece's size.
    raw_parts: int = 0
    attachment_parts: dict[int, tuple[str, int]] = field(default_factory=dict)
    # Look for the mail's fingerprint before writing? Over SMTP a mail is nearly always new,
    # and messages.fingerprint is unique: a redelivery fails its INSERT, its savepoint rolls
    # back, and the retry looks first (one SELECT a mail fewer, issue 10). IMAP's polls and
    # history imports meet mails already kept as a matter of course: they look first.
    look_first: bool = True


@dataclass(frozen=True, slots=True)
class StoredMail:
    """What an after-store hook learns about a mail just written (same transaction)."""

    ticket_id: int
    ticket_number: int
    message_pk: int
    created: bool  # a new ticket (including a follow-up)
    reopened: bool
    department: str  # slug of the ticket's department
    contact: str | None  # normalized sender
    reply_to: str | None  # where answers to the customer go (Reply-To, else sender)
    mail: ParsedMail
    envelope: Envelope
    classification: Classification
    now: datetime
    suppress_ack: bool = False  # a rule said: no acknowledgement for this one


# Runs inside the ingest transaction: what it writes commits, or rolls back, with the mail
# (DESIGN 3: an outbox row is written in the same transaction as its cause).
AfterStore = Callable[[AsyncSession, StoredMail], Awaitable[list[tuple[str, dict[str, Any]]]]]


@dataclass(frozen=True, slots=True)
class Incoming:
    """What an intercept hook sees of a mail before threading (inside the transaction)."""

    raw: bytes
    sha256: str
    mail: ParsedMail
    envelope: Envelope
    routes: tuple[Route, ...]
    classification: Classification
    now: datetime
    raw_parts: int = 0  # the raw bytes are stored already, in pieces (store/blobs.py)


# Mail meant for deskgate itself (a DSN to a VERP address, an address verification): a hook
# that answers a Verdict consumes it, so it never opens, reopens or threads into a ticket.
Intercept = Callable[[AsyncSession, Incoming], Awaitable[Verdict | None]]


class Pipeline:
    def __init__(self, settings: Settings, store: Store,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        departments = {d.slug: d.addresses for d in settings.departments}
        self.directory = Directory.from_departments(departments,
                                                    settings.tickets.reply_token_secret)
        self.tag = tag_pattern(settings.tickets.tag_format)
        self.follow_up_window = timedelta(days=settings.tickets.follow_up_window_days)
        self.own_addresses = settings.own_addresses
        self.departments = {d.slug: d for d in settings.departments}
        self.department_ids: dict[str, int] = {}
        self.after_store: list[AfterStore] = []
        self.cid_url = DEFAULT_CID_URL  # where html_safe points cid: images (issue 12)
        self.intercepts: list[Intercept] = []
        self.auth = AuthChecker(settings.inbound.authentication, settings.hostname)
        self.commits = GroupCommit(store)  # concurrent mails share a commit (DESIGN 4)
        # Small mails' parse and readable view in a helper process (the daemon's; None: here).
        self.preparer: Preparer | None = None
        self._ingesting = 0  # mails in ingest() now

    async def start(self) -> None:
        async with self.store.transaction() as session:
            self.department_ids = await repo.sync_departments(session, self.settings.departments)

    def route(self, recipient: str) -> Route:
        return route_recipient(recipient, self.directory)

    async def ingest(self, raw: bytes, envelope: Envelope) -> Verdict:
        self._ingesting += 1
        try:
            return await self._ingest(raw, envelope)
        finally:
            self._ingesting -= 1

    async def _prepare(self, raw: bytes) -> Prepared:
        """Parse, hash and readable view: in the helper process when other mails are in flight
        (the loop has their work to do meanwhile); a mail on its own is quicker here, without
        the round trip (measured: one session 7-10 % slower through the helper)."""
        if len(raw) > BIG_MAIL_BYTES:  # off the GIL: in a thread it would hold it in turns
            return await in_process(functools.partial(prepare, cid_url=self.cid_url), raw)
        if self.preparer is not None and self.preparer.cid_url == self.cid_url and \
                self._ingesting > HELPER_ABOVE_INFLIGHT:
            return await self.preparer.prepare(raw)
        return prepare(raw, self.cid_url)

    async def _ingest(self, raw: bytes, envelope: Envelope) -> Verdict:
        routes = [r for r in map(self.route, envelope.rcpt_tos) if r.accepted]
        if not routes:
            return Verdict(Outcome.REJECTED, reason="no recipient is one of our addresses")
        prepared = await self._prepare(raw)
        mail, sha, failure = prepared.mail, prepared.sha256, prepared.failure
        bound = log.bind(peer=envelope.peer, channel=envelope.channel, raw=sha[:16])
        if mail is None or mail.fatal:
            return await self._quarantine(raw, sha, envelope, failure or str(mail and mail.fatal),
                                          bound)
        auth = await self.auth.check(raw, mail, envelope)  # from the DNS cache, else a thread
        ctx = self._context(raw, sha, envelope, mail, routes, auth, prepared)
        bound = bound.bind(message_id=mail.message_id, department=routes[0].department,
                           rules=[h.rule for h in ctx.classification.hits])
        if len(raw) > BIG_MAIL_BYTES:  # a big mail would hold up a whole batch
            await self._keep_in_parts(ctx, bound)
            return await self._store_alone(ctx, bound)
        return await self._store_batched(ctx, bound)

    async def _keep_in_parts(self, ctx: _Context, bound: Any) -> None:
        """A big mail's raw bytes, and its attachments over a piece's size, committed in
        pieces before the rest (store/blobs.py), so SQLite's write lock is held for one piece
        at a time and small mails' batches go in between. The mail's rows, which point at the
        pieces, still commit or roll back as one; a 451 leaves only pieces, which the sender's
        retry finds and does not send again."""
        limit = self.settings.inbound.max_attachment_bytes
        now = self.clock()
        try:
            ctx.raw_parts = await blobs.keep_in_parts(self.store, ctx.sha256, ctx.raw, now)
            for index, part in enumerate(ctx.attachments):
                if len(part.payload) > blobs.PART_BYTES:  # hashed off the loop, either way
                    sha = await asyncio.to_thread(_sha256, part.payload)
                    count = await blobs.keep_in_parts(self.store, sha, part.payload, now) \
                        if len(part.payload) <= limit else 0  # over the limit: not kept
                    ctx.attachment_parts[index] = (sha, count)
        except (SQLAlchemyError, OSError) as exc:
            raise _unavailable(bound, exc) from exc

    async def _store_batched(self, ctx: _Context, bound: Any) -> Verdict:
        """Group commit: this mail's writes share a transaction with concurrent mails, each
        in its own savepoint; returns once the commit holding them is durable."""
        def conflict(attempt: int, exc: IntegrityError) -> None:
            # The mail was kept before (a redelivery), or another session or instance
            # committed the same mail (or contact) first: the next attempt (next batch)
            # looks for it and answers duplicate.
            ctx.look_first = True
            bound.info("ingest.conflict", attempt=attempt, error=type(exc.orig).__name__)

        try:
            verdict, log_done = await self.commits.run(
                lambda session: self._store_in(session, ctx, bound), on_conflict=conflict)
        except CommitFailed as exc:
            cause = exc.__cause__
            error = cause.strerror if isinstance(cause, OSError) else type(cause).__name__
            bound.error("ingest.store_unavailable", error=error, batch=str(exc))
            raise StoreUnavailable(f"store unavailable: {error}") from exc
        except IntegrityError as exc:
            raise StoreUnavailable("store conflict did not settle after 3 attempts") from exc
        except (SQLAlchemyError, OSError) as exc:
            raise _unavailable(bound, exc) from exc
        log_done()
        return verdict

    async def _store_alone(self, ctx: _Context, bound: Any) -> Verdict:
        """One mail, one transaction: retried when another writer committed it first."""
        for attempt in range(3):
            try:
                return await self._store(ctx, bound)
            except IntegrityError as exc:
                # Kept before, or another session or instance committed the same mail (or
                # contact) first; the next attempt looks for it and answers duplicate.
                ctx.look_first = True
                bound.info("ingest.conflict", attempt=attempt, error=type(exc.orig).__name__)
            except (SQLAlchemyError, OSError) as exc:
                raise _unavailable(bound, exc) from exc
        raise StoreUnavailable("store conflict did not settle after 3 attempts")

    def _context(self, raw: bytes, sha: str, envelope: Envelope, mail: ParsedMail,
                 routes: list[Route], auth: AuthOutcome, prepared: Prepared | None = None
                 ) -> _Context:
        sender = normalize_address(mail.from_addr) or normalize_address(envelope.mail_from)
        if prepared is not None and prepared.view is not None:
            view, attachments = prepared.view, prepared.attachments
        else:
            view, attachments = readable_or_plain(mail, self.cid_url), stored_attachments(mail)
        return _Context(
            raw=raw, sha256=sha, envelope=envelope, mail=mail, routes=routes,
            classification=classify(mail, envelope, self.own_addresses), sender=sender,
            fingerprint=fingerprint(mail),
            reply_to=next(filter(None, map(normalize_address, mail.reply_to)), None),
            authenticated=auth.authenticated, auth_results=auth.header,
            view=view, attachments=attachments, look_first=envelope.channel != "smtp",
        )

    async def _store(self, ctx: _Context, bound: Any) -> Verdict:
        async with self.store.transaction() as session:
            verdict, log_done = await self._store_in(session, ctx, bound)
        log_done()
        return verdict

    async def _store_in(self, session: AsyncSession, ctx: _Context, bound: Any
                        ) -> tuple[Verdict, Callable[[], None]]:
        """One mail's writes inside a transaction the caller commits; the second value logs
        the outcome and is called only once that commit succeeded."""
        duplicate = await repo.find_by_fingerprint(session, ctx.fingerprint) \
            if ctx.look_first else None
        if duplicate is not None:
            return (Verdict(Outcome.DUPLICATE, duplicate[1], "already stored"),
                    lambda: bound.info("ingest.duplicate", ticket=duplicate[1]))
        incoming = Incoming(ctx.raw, ctx.sha256, ctx.mail, ctx.envelope, tuple(ctx.routes),
                            ctx.classification, self.clock(), ctx.raw_parts)
        for intercept in self.intercepts:
            if (consumed := await intercept(session, incoming)) is not None:
                return consumed, lambda: bound.info("ingest.consumed",
                                                    ticket=consumed.ticket_number,
                                                    reason=consumed.reason)
        threading, decision, now = await self._decide(session, ctx)
        if decision.action is Action.QUARANTINE:
            verdict = await self._quarantine_in(session, ctx.raw, ctx.sha256, ctx.envelope,
                                                decision.reason, now, ctx.raw_parts)
        else:
            verdict = await self._apply(session, ctx, threading, decision, now)
        return verdict, lambda: bound.info(
            "ingest.stored", outcome=verdict.outcome.value, ticket=verdict.ticket_number,
            thread=threading.step, kind=ctx.classification.kind.value,
            reason=verdict.reason or None)

    async def _decide(self, session: AsyncSession, ctx: _Context
                      ) -> tuple[ThreadDecision, Decision, datetime]:
        """Threading, lifecycle and the operator's rules: shared by ingest and dry_run."""
        threading = await self._thread(session, ctx)
        now = self.clock()
        decision = decide(threading, ctx.classification.kind, now, self.follow_up_window)
        ctx.rules = await self._rules(session, ctx, decision, now)
        if decision.action is Action.APPEND:
            return threading, decision, now
        if ctx.rules and ctx.rules.effects.quarantine:
            reason = f"quarantined by rule {', '.join(ctx.rules.fired)}"
            return threading, Decision(Action.QUARANTINE, reason=reason), now
        if ctx.sender is None and decision.action is not Action.QUARANTINE:
            return threading, Decision(Action.QUARANTINE, reason="no usable sender address"), now
        return threading, decision, now

    async def dry_run(self, raw: bytes, envelope: Envelope) -> dict[str, Any]:
        """What ingest would do with this mail, computed the same way; nothing is written."""
        routes = [r for r in map(self.route, envelope.rcpt_tos) if r.accepted]
        if not routes:
            return {"outcome": Outcome.REJECTED.value, "reason": "no recipient is ours"}
        mail, sha, failure = parse_and_hash(raw)
        if mail is None or mail.fatal:
            return {"outcome": Outcome.QUARANTINED.value, "reason": failure or mail and mail.fatal}
        ctx = self._context(raw, sha, envelope, mail, routes,
                            await self.auth.check(raw, mail, envelope))
        async with self.store.read() as session:  # rolled back on close
            if await repo.find_by_fingerprint(session, ctx.fingerprint) is not None:
                return {"outcome": Outcome.DUPLICATE.value, "reason": "already stored"}
            threading, decision, _ = await self._decide(session, ctx)
        result: dict[str, Any] = {
            "outcome": "quarantined" if decision.action is Action.QUARANTINE else "stored",
            "action": decision.action.value, "reason": decision.reason or threading.detail,
            "kind": ctx.classification.kind.value, "sender": ctx.sender,
            "classification": [h.rule for h in ctx.classification.hits],
            "rules_fired": list(ctx.rules.fired) if ctx.rules else [],
            "rule_errors": [list(e) for e in ctx.rules.errors] if ctx.rules else [],
            "ticket": decision.ticket.number if decision.ticket else None}
        if decision.action in (Action.CREATE, Action.FOLLOW_UP):
            plan = self.plan(ctx.rules, routes[0].department or "", ctx.sender, mail.subject)
            result["new_ticket"] = {
                "department": plan.department, "priority": plan.priority,
                "category": plan.category, "subcategory": plan.subcategory,
                "product": plan.product, "tags": list(plan.tags), "owner": plan.owner,
                "fields": plan.fields, "acknowledged": not (plan.suppress_ack or
                                                            ctx.classification.automated)}
        return result

    async def _rules(self, session: AsyncSession, ctx: _Context, decision: Decision,
                     now: datetime) -> RuleOutcome | None:
        """The operator's rules for a new ticket (and every message when configured)."""
        config = self.settings.rules
        appending = decision.action is Action.APPEND
        if not config.rules or appending and not config.on_every_message:
            return None
        if appending and decision.ticket is not None:
            department = decision.ticket.department
        else:
            department = ctx.routes[0].department or ""
        outcome = evaluate(config.rules, self.facts(ctx.mail, ctx.envelope, ctx.sender,
                                                    department, ctx.authenticated, now,
                                                    await self._account_name(session, ctx.sender)))
        for rule, error in outcome.errors:  # a bad rule is skipped; the mail goes on
            log.warning("rules.error", rule=rule, error=error, message_id=ctx.mail.message_id)
        return outcome

    def facts(self, mail: ParsedMail, envelope: Envelope, sender: str | None, department: str,
              authenticated: bool | None, now: datetime, account: str | None) -> MailFacts:
        return MailFacts(
            sender=sender, recipients=envelope.rcpt_tos, subject=mail.subject,
            body=mail.text[:65536], department=department, language=language_of(mail.headers),
            has_attachment=any(not a.inline for a in mail.attachments),
            auth={True: "pass", False: "fail", None: "none"}[authenticated],
            in_business_hours=is_open(now, self.departments[department].sla.hours),
            account=account)

    async def _account_name(self, session: AsyncSession, sender: str | None) -> str | None:
        """The sender's company: a known account of its domain, else the domain itself
        unless it is a free-mail provider (then the contact belongs to no account)."""
        domain = sender.rsplit("@", 1)[-1] if sender else ""
        if not domain:
            return None
        found = await repo.account_for_domain(session, domain)
        if found is not None:
            return found[1]
        return None if domain in self.settings.rules.free_mail_domains else domain

    def plan(self, rules: RuleOutcome | None, routed_department: str, sender: str | None,
             subject: str) -> TicketPlan:
        return plan_ticket(rules, routed_department,
                           lambda slug: self.departments[slug].sla.priority_for(sender, subject))

    async def _thread(self, session: AsyncSession, ctx: _Context) -> ThreadDecision:
        mail = ctx.mail
        ids = [*mail.in_reply_to, *mail.references]
        by_token = None
        token_route = next((r for r in ctx.routes if r.kind is RouteKind.REPLY), None)
        if token_route is not None and token_route.ticket_number is not None:
            by_token = await repo.ticket_ref(session, token_route.ticket_number)
        by_tag, participant = None, False
        tag = find_tag(mail.subject, self.tag)
        if tag is not None:
            by_tag = await repo.ticket_ref(session, tag)
            if by_tag is not None and ctx.sender:
                participant = await repo.is_participant(session, by_tag.id, ctx.sender)
        by_id = await repo.tickets_by_message_ids(session, ids)
        # Failed authentication: only our own Message-IDs thread (DESIGN 4, Authenticity).
        sent = await repo.sent_message_ids(session, list(by_id)) \
            if by_id and ctx.authenticated is False else frozenset()
        evidence = ThreadEvidence(by_id, by_token, by_tag, participant, sent)
        return thread(mail, evidence, ctx.authenticated)

    async def _apply(self, session: AsyncSession, ctx: _Context, threading: ThreadDecision,
                     decision: Decision, now: datetime) -> Verdict:
        await repo.put_raw(session, ctx.sha256, ctx.raw, now, ctx.raw_parts)
        events: list[tuple[str, dict[str, Any]]] = list(decision.events)
        if decision.action is Action.APPEND and decision.ticket is not None:
            ticket_id, number = decision.ticket.id, decision.ticket.number
            if decision.new_status is not None:  # reopened: the SLA clock runs again
                ticket = await session.get(Ticket, ticket_id)
                assert ticket is not None
                await apply_status(session, ticket, decision.new_status, now,
                                   self.departments[decision.ticket.department])
            else:
                await repo.touch_ticket(session, ticket_id, now)
        else:
            ticket_id, number, owner_id = await self._create_ticket(session, ctx, now, decision)
            events.append(("created", {"channel": ctx.envelope.channel, "thread": threading.detail,
                                       "to": ctx.routes[0].address}))
            if decision.action is Action.FOLLOW_UP and decision.ticket is not None:
                events.append(("follow_up_of", {"ticket": decision.ticket.number}))
            if owner_id is not None:
                events.append(("assigned", {"agent": owner_id, "by": "rule" if ctx.plan
                                            and ctx.plan.owner else "assignment"}))
        message_pk = await repo.insert_row(session, Message,
                                           self._message_row(ctx, ticket_id, now))
        events.extend(await self._attachments(session, ctx, message_pk))
        if ctx.classification.hits:
            events.append(("rules", {"kind": ctx.classification.kind.value, "hits": [
                {"rule": h.rule, "reason": h.reason} for h in ctx.classification.hits]}))
        stored = StoredMail(
            ticket_id=ticket_id, ticket_number=number, message_pk=message_pk,
            created=decision.action is not Action.APPEND,
            reopened=any(kind == "reopened" for kind, _ in decision.events),
            department=decision.ticket.department if decision.action is Action.APPEND and
            decision.ticket else (ctx.plan.department if ctx.plan else ""),
            contact=ctx.sender,
            reply_to=ctx.reply_to or ctx.sender,
            mail=ctx.mail, envelope=ctx.envelope, classification=ctx.classification, now=now,
            suppress_ack=bool(ctx.plan and ctx.plan.suppress_ack))
        if ctx.rules and ctx.rules.fired:
            events.append(("rules_fired", {"rules": list(ctx.rules.fired)}))
        for hook in self.after_store:
            events.extend(await hook(session, stored))
        await repo.add_events(session, ticket_id, now, events)
        return Verdict(Outcome.STORED, number, threading.step,
                       tuple(h.rule for h in ctx.classification.hits))

    async def _create_ticket(self, session: AsyncSession, ctx: _Context, now: datetime,
                             decision: Decision) -> tuple[int, int, int | None]:
        """The new ticket's (id, number, owner id): one INSERT, no ORM object (issue 10)."""
        assert ctx.sender is not None
        # A mail to several of our addresses makes one ticket, in the first one's department;
        # the operator's rules may send it elsewhere and set its fields.
        plan = ctx.plan = self.plan(ctx.rules, ctx.routes[0].department or "", ctx.sender,
                                    ctx.mail.subject)
        department = self.departments[plan.department]
        slug = department.slug
        sender = ctx.sender
        contact_id = await repo.upsert_contact(
            session, sender, ctx.mail.from_name[:200], now,
            account_of_new=lambda: self._account_id(session, sender, now))
        due = due_dates(now, department.sla.targets.get(plan.priority), department.sla.hours)
        department_id = self.department_ids.get(slug) or await repo.department_id(session, slug)
        owner_id = await self._owner(session, plan, department)
        ticket_id, number = await repo.insert_ticket(session, dict(
            department_id=department_id,
            contact_id=contact_id, subject=ctx.mail.subject[:2000] or "(no subject)",
            status=(decision.new_status or "open"), priority=plan.priority, channel="email",
            reply_to=ctx.reply_to, language=department.language,
            follow_up_of_id=decision.ticket.id if decision.ticket else None,
            tags=list(plan.tags), category=plan.category, subcategory=plan.subcategory,
            product=plan.product, custom_fields=plan.fields, owner_id=owner_id,
            created_at=now, updated_at=now, first_response_due_at=due.first_response_due_at,
            due_at=due.due_at))
        return ticket_id, number, owner_id

    async def _owner(self, session: AsyncSession, plan: TicketPlan,
                     department: DepartmentSettings) -> int | None:
        """A rule's owner wins; otherwise the department's assignment strategy picks."""
        if plan.owner:
            return await repo.agent_id(session, plan.owner)
        if department.assignment == "none":
            return None
        dept_id = self.department_ids.get(department.slug) or \
            await repo.department_id(session, department.slug)
        return pick_owner(department.assignment,
                          await repo.assignment_candidates(session, dept_id))

    async def _account_id(self, session: AsyncSession, sender: str, now: datetime) -> int | None:
        domain = sender.rsplit("@", 1)[-1]
        found = await repo.account_for_domain(session, domain) if domain else None
        if found is not None:  # a known company: the domain is already its own
            return found[0]
        if not domain or domain in self.settings.rules.free_mail_domains:
            return None  # as _account_name: a free-mail sender belongs to no account
        return await repo.ensure_account(session, domain, [domain], now)

    def _message_row(self, ctx: _Context, ticket_id: int, now: datetime) -> dict[str, Any]:
        mail = ctx.mail
        view = ctx.view or readable_or_plain(mail, self.cid_url)
        return dict(
            ticket_id=ticket_id, direction="in", kind=ctx.classification.kind.value,
            message_id=mail.message_id, fingerprint=ctx.fingerprint,
            in_reply_to=list(mail.in_reply_to), references=list(mail.references)[-50:],
            from_addr=ctx.sender, from_name=mail.from_name[:200], reply_to=list(mail.reply_to),
            to=list(mail.to), cc=list(mail.cc), subject=mail.subject, date=mail.date,
            received_at=now, text=view.text, html=mail.html, visible_text=view.visible_text,
            html_safe=view.html_safe, language=view.language,
            auth_results=ctx.auth_results, raw_sha256=ctx.sha256,
            envelope_from=ctx.envelope.mail_from, envelope_to=list(ctx.envelope.rcpt_tos),
            peer=ctx.envelope.peer, channel=ctx.envelope.channel,
            rule_hits=[{"rule": h.rule, "reason": h.reason} for h in ctx.classification.hits],
            defects=list(mail.defects)[:50])

    async def _attachments(self, session: AsyncSession, ctx: _Context, message_id: int
                           ) -> list[tuple[str, dict[str, Any]]]:
        limit = self.settings.inbound.max_attachment_bytes
        rows, events = [], []
        for index, part in enumerate(ctx.attachments):
            too_big = len(part.payload) > limit
            reason = f"larger than the {limit} byte attachment limit; kept in the raw mail" \
                if too_big else None
            sha, parts = ctx.attachment_parts.get(index) or (_sha256(part.payload), 0)
            rows.append({"message_id": message_id, "filename": part.filename,
                         "content_type": part.content_type, "size": len(part.payload),
                         "sha256": sha, "inline": part.inline, "content_id": part.content_id,
                         "content": None if too_big or parts else part.payload,
                         "not_kept_reason": reason, "parts": parts})
            if too_big:
                events.append(("attachment_not_kept", {"filename": part.filename,
                                                       "size": len(part.payload),
                                                       "reason": reason}))
        await repo.add_attachments(session, rows)
        return events

    async def _quarantine(self, raw: bytes, sha: str, envelope: Envelope, reason: str,
                          bound: Any) -> Verdict:
        try:
            # A big unparseable mail (a MIME bomb, say) goes in pieces as a parsed one does.
            parts = await blobs.keep_in_parts(self.store, sha, raw, self.clock()) \
                if len(raw) > BIG_MAIL_BYTES else 0
            async with self.store.transaction() as session:
                verdict = await self._quarantine_in(session, raw, sha, envelope, reason,
                                                    self.clock(), parts)
        except (SQLAlchemyError, OSError) as exc:  # disk full is an OSError on SQLite
            raise _unavailable(bound, exc) from exc
        bound.warning("ingest.quarantined", reason=reason)
        return verdict

    async def _quarantine_in(self, session: AsyncSession, raw: bytes, sha: str,
                             envelope: Envelope, reason: str, now: datetime,
                             raw_parts: int = 0) -> Verdict:
        if await repo.find_quarantined(session, sha) is not None:
            return Verdict(Outcome.DUPLICATE, reason=f"already quarantined: {reason}")
        await repo.put_raw(session, sha, raw, now, raw_parts)
        await repo.add(session, Quarantine(
            raw_sha256=sha, reason=reason[:2000], envelope_from=envelope.mail_from,
            envelope_to=list(envelope.rcpt_tos), peer=envelope.peer, channel=envelope.channel,
            received_at=now, state="held"))
        return Verdict(Outcome.QUARANTINED, reason=reason)
