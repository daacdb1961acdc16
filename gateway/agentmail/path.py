"""AgentPath: what the submission port does with an authenticated agent's mail (DESIGN 3a).

The agent's mail is never relayed as it is: it is recorded on its ticket and deskgate
composes what the customer receives (From the department's verified address, the ticket's
threading headers and reply token), so internals never leak and every answer is on record.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import structlog
from markupsafe import Markup
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.agentmail.commands import Command, ParsedCommands, parse_commands, strip_internal
from gateway.agentmail.decide import AgentDecision, AgentFacts, Plan, decide_agent_mail
from gateway.agents import AgentIdentity, may_act
from gateway.errors import DeskgateError
from gateway.ingest.addresses import RouteKind, find_tag, reply_address
from gateway.ingest.identify import ThreadEvidence, TicketRef, normalize_address, thread
from gateway.ingest.model import Envelope, ParsedMail
from gateway.ingest.offload import BIG_MAIL_BYTES
from gateway.ingest.parse import parse
from gateway.ingest.pipeline import Pipeline, fingerprint
from gateway.ingest.readable import best_text
from gateway.outbound import queue
from gateway.outbound.compose import Outgoing, compose
from gateway.outbound.rating import RatingMail
from gateway.outbound.render import Rendered
from gateway.replies import R250_DUPLICATE, R451_TEMPORARY, R550_NO_SUCH_ADDRESS, R550_NOT_ALLOWED
from gateway.settings import DepartmentSettings, Settings
from gateway.tickets.actions import change_priority, change_status
from gateway.tickets.lifecycle import Status
from gateway.tickets.sla import due_dates
from store import blobs, repo
from store.engine import Store
from store.models import Agent, AgentDepartment, Contact, Department, Message, Ticket

log = structlog.get_logger("deskgate.agentmail")
Events = list[tuple[str, dict[str, Any]]]
STATUS_COMMANDS = {"close": Status.CLOSED, "hold": Status.ON_HOLD, "open": Status.OPEN,
                   "waiting": Status.WAITING_ON_CUSTOMER, "escalate": Status.ESCALATED}
APPROVAL_STATE = "approval"  # a newbie agent's reply, until `deskgate outbox approve`
APPROVAL_REASON = "awaiting a supervisor's approval (deskgate outbox approve {id})"


@dataclass(slots=True)
class _Mail:
    """One agent mail, parsed and read before the transaction."""

    raw: bytes
    sha256: str
    mail: ParsedMail
    envelope: Envelope
    commands: ParsedCommands
    text: str  # what the customer may read: no commands, no quoted internals
    fingerprint: str
    raw_parts: int = 0  # the raw bytes are stored already, in pieces (store/blobs.py)


@dataclass(frozen=True, slots=True)
class _Answered:
    """The ticket the mail threads into and the customer message it answers."""

    ticket: TicketRef | None
    message_pk: int | None  # messages.id of the customer mail being answered
    message_id: str | None  # its Message-ID
    references: tuple[str, ...]


class AgentPath:
    def __init__(self, settings: Settings, store: Store, pipeline: Pipeline, outbound: Any,
                 rating: RatingMail) -> None:
        self.settings, self.store, self.pipeline = settings, store, pipeline
        self.renderer = outbound.renderer
        self.queued = outbound._wake_soon  # noqa: SLF001 — nudges the relay worker
        self.rating = rating

    def reload(self, settings: Settings, pipeline: Pipeline) -> None:
        self.settings, self.pipeline = settings, pipeline

    @property
    def departments(self) -> dict[str, DepartmentSettings]:
        return self.pipeline.departments

    async def check_recipient(self, agent: AgentIdentity, address: str) -> str | None:
        """At RCPT: customers and our addresses pass; a ticket token outside the agent's
        departments is refused here, so the client shows the reason before DATA."""
        route = self.pipeline.route(address)
        if route.kind in (RouteKind.RELAY, RouteKind.DEPARTMENT):
            return None
        if route.kind is RouteKind.REPLY and route.ticket_number is not None:
            async with self.store.read() as session:
                ref = await repo.ticket_ref(session, route.ticket_number)
            if ref is None:
                return R550_NO_SUCH_ADDRESS
            if not may_act(agent.profile, agent.departments, ref.department):
                log.info("agentmail.refused", agent=agent.email, ticket=ref.number,
                         reason="department")
                return f"{R550_NOT_ALLOWED}: you are not an agent of the department " \
                       f"{ref.department!r} (ticket {ref.number})"
            return None
        if route.kind is RouteKind.UNKNOWN:
            async with self.store.read() as session:
                if await self._agent_addresses([route.address], session):
                    return None  # a colleague in copy: never mailed as a customer
        return R550_NO_SUCH_ADDRESS

    async def deliver(self, agent: AgentIdentity, raw: bytes, envelope: Envelope) -> str:
        """250 only after the reply, its outbox rows and every command are committed."""
        prepared = await asyncio.to_thread(self._prepare, raw, envelope) \
            if len(raw) > BIG_MAIL_BYTES else self._prepare(raw, envelope)
        if isinstance(prepared, str):
            return prepared
        sender = normalize_address(prepared.mail.from_addr)
        if sender != agent.email:
            log.info("agentmail.refused", agent=agent.email, header_from=sender,
                     reason="header From")
            return f"553 5.7.1 The From: header must be your own address <{agent.email}>"
        bound = log.bind(agent=agent.email, peer=envelope.peer,
                         message_id=prepared.mail.message_id)
        for attempt in range(2):
            try:
                # A big mail's bytes go ahead in pieces, as an inbound one's (store/blobs.py);
                # a refusal leaves them unclaimed, for the hourly sweep.
                if len(raw) > BIG_MAIL_BYTES and not prepared.raw_parts:
                    prepared.raw_parts = await blobs.keep_in_parts(
                        self.store, prepared.sha256, raw, self.pipeline.clock())
                async with self.store.transaction() as session:
                    # A refusal is decided before anything is written: nothing to undo.
                    return await self._deliver(session, agent, prepared, bound)
            except IntegrityError:  # the same mail committed concurrently: next try says so
                bound.info("agentmail.conflict", attempt=attempt)
            except (SQLAlchemyError, OSError) as exc:
                bound.error("agentmail.store_unavailable", error=type(exc).__name__)
                return R451_TEMPORARY
        return R451_TEMPORARY

    def _prepare(self, raw: bytes, envelope: Envelope) -> _Mail | str:
        try:
            mail = parse(raw)
        except Exception:  # noqa: BLE001 — parse must never raise; answer, do not crash
            mail = None
        if mail is None or mail.fatal:
            return "554 5.6.0 The message could not be parsed as a mail"
        own_text = strip_internal(best_text(mail))
        commands = parse_commands(mail.subject, own_text)
        return _Mail(raw, hashlib.sha256(raw).hexdigest(), mail, envelope, commands,
                     commands.body.strip(), fingerprint(mail))

    async def _deliver(self, session: AsyncSession, agent: AgentIdentity, m: _Mail,
                       bound: Any) -> str:
        if await repo.find_by_fingerprint(session, m.fingerprint) is not None:
            bound.info("agentmail.duplicate")
            return R250_DUPLICATE
        answered = await self._answered(session, m)
        routes = [self.pipeline.route(r) for r in m.envelope.rcpt_tos]
        agents = await self._agent_addresses([r.address for r in routes], session)
        customers = [r.address for r in routes if r.kind is RouteKind.RELAY and
                     r.address not in agents]
        department = answered.ticket.department if answered.ticket else \
            self._new_ticket_department(agent, routes)
        names = {c.name for c in m.commands.commands}
        # Another agent's answer after the message being answered (collision detection).
        other = await self._other_reply(session, agent, answered) if answered.ticket else None
        decision = decide_agent_mail(AgentFacts(
            profile=agent.profile, departments=agent.departments,
            ticket=answered.ticket.number if answered.ticket else None, department=department,
            has_customer=bool(customers), has_text=bool(m.text),
            has_commands=bool(m.commands.commands), note="note" in names,
            force="force" in names, collision=other[0] if other else None))
        if decision.plan is Plan.REFUSE:
            bound.info("agentmail.refused", reason=decision.reason)
            return f"{R550_NOT_ALLOWED}: {decision.reason}"
        now = self.pipeline.clock()
        await repo.put_raw(session, m.sha256, m.raw, now, m.raw_parts)
        if decision.plan is Plan.NEW_TICKET:
            assert department is not None
            ticket = await self._new_ticket(session, agent, m, customers[0], department, now)
            customers = customers[1:]
            events: Events = [("created", {"channel": "agent", "by": agent.email})]
        else:
            assert answered.ticket is not None
            ticket = await session.get(Ticket, answered.ticket.id)
            assert ticket is not None
            events = []
        events += await self._act(session, agent, m, decision, ticket, answered, customers,
                                  other, now)
        if decision.plan is not Plan.HOLD:
            events += await self._commands(session, agent, m.commands, ticket, now)
        await repo.add_events(session, ticket.id, now, events)
        bound.info("agentmail.stored", ticket=ticket.number, plan=decision.plan.value,
                   approval=decision.needs_approval or None)
        return f"250 2.0.0 OK: ticket {ticket.number} ({decision.plan.value})"

    async def _act(self, session: AsyncSession, agent: AgentIdentity, m: _Mail,
                   decision: AgentDecision, ticket: Ticket, answered: _Answered,
                   cc: Sequence[str], other: tuple[str, str] | None, now: datetime) -> Events:
        plan = decision.plan
        kind = {Plan.REPLY: "agent_reply", Plan.NEW_TICKET: "agent_reply", Plan.NOTE: "note",
                Plan.HOLD: "agent_reply_held", Plan.COMMANDS: "agent_commands"}[plan]
        row = await repo.add(session, Message(
            ticket_id=ticket.id, direction="out", kind=kind, message_id=m.mail.message_id,
            fingerprint=m.fingerprint, in_reply_to=list(m.mail.in_reply_to),
            references=list(m.mail.references)[-50:], from_addr=agent.email,
            from_name=agent.name[:200], reply_to=[], to=list(m.mail.to), cc=list(m.mail.cc),
            subject=m.commands.subject or m.mail.subject, date=m.mail.date, received_at=now,
            text=m.text, visible_text=m.text, raw_sha256=m.sha256,
            envelope_from=m.envelope.mail_from, envelope_to=list(m.envelope.rcpt_tos),
            peer=m.envelope.peer, channel="submission", rule_hits=[], defects=[],
            agent_id=agent.id))
        if plan is Plan.NOTE:
            return [("note", {"agent": agent.email, "message": row.id,
                              "shared_with": await self._share_note(session, agent, m,
                                                                    ticket, now)})]
        if plan is Plan.COMMANDS:
            return []
        if plan is Plan.HOLD:
            outbox = await self._notice(session, agent, ticket, "collision", now, lines=[
                "Resend your mail with #force to send it anyway."],
                quoted=other[1] if other else "", author=other[0] if other else "")
            return [("collision", {"agent": agent.email, "message": row.id,
                                   "other": other[0] if other else None, "notice": outbox})]
        return await self._reply(session, agent, m, decision, ticket, answered, cc, row, now)

    async def _reply(self, session: AsyncSession, agent: AgentIdentity, m: _Mail,
                     decision: AgentDecision, ticket: Ticket, answered: _Answered,
                     cc: Sequence[str], row: Message, now: datetime) -> Events:
        dept = self.departments[await self._slug(session, ticket)]
        customer = ticket.reply_to or await session.scalar(
            select(Contact.email).where(Contact.id == ticket.contact_id))
        assert customer is not None
        cc = [a for a in dict.fromkeys(cc) if a != customer]
        tag = self.settings.tickets.tag_format.format(number=ticket.number)
        language = ticket.language or dept.language
        rendered = self.renderer.render("agent_reply", language, {
            "subject": ticket.subject, "body": m.text, "body_html": _html(m.text),
            "agent_name": agent.name, "department": dept.name, "ticket_number": ticket.number,
            "tag": tag}, department=dept.slug)
        if decision.plan is Plan.NEW_TICKET:
            rendered = replace(rendered, subject=m.commands.subject or m.mail.subject)
        sender, secret = dept.addresses[0], self.settings.tickets.reply_token_secret
        composed = compose(rendered, Outgoing(
            from_addr=sender, from_name=f"{agent.name} via {dept.name}", to=customer,
            hostname=self.settings.hostname, date=now, tag=tag,
            reply_to=reply_address(sender, ticket.number, secret),
            in_reply_to=answered.message_id, references=answered.references,
            auto_submitted="no", language=language,
            extra_headers=(("Cc", ", ".join(cc)),) if cc else ()))
        # The recorded copy carries what the customer got; the agent's own Message-ID stays
        # findable through the first row's fingerprint and references.
        await repo.add(session, Message(
            ticket_id=ticket.id, direction="out", kind="agent_reply_sent",
            message_id=composed.message_id,
            in_reply_to=[answered.message_id] if answered.message_id else [],
            references=list(answered.references)[-50:], from_addr=sender,
            from_name=f"{agent.name} via {dept.name}"[:200], reply_to=[], to=[customer],
            cc=list(cc), subject=composed.subject, received_at=now, text=rendered.text,
            html=rendered.html, language=language, envelope_to=[customer, *cc],
            channel="outbox", rule_hits=[], defects=[], agent_id=agent.id))
        outbox = []
        for recipient in (customer, *cc):
            queued = await queue.enqueue(session, kind="agent_reply", from_addr=sender,
                                         to=recipient, message_id=composed.message_id,
                                         mime=composed.mime, now=now, ticket_id=ticket.id,
                                         cause_message_id=row.id)
            if decision.needs_approval:
                queued.state = APPROVAL_STATE
                queued.last_error = APPROVAL_REASON.format(id=queued.id)
            outbox.append(queued.id)
        await session.flush()
        events: Events = [("agent_reply", {"agent": agent.email, "outbox": outbox,
                                           "to": [customer, *cc],
                                           "approval": decision.needs_approval})]
        if decision.needs_approval:
            events.append(("approval_requested", {"agent": agent.email, "outbox": outbox}))
            await self._notice(session, agent, ticket, "approval", now, lines=[
                f"deskgate outbox approve {i}" for i in outbox])
        else:
            self.queued()
        values: dict[str, Any] = {"updated_at": now}
        if ticket.first_response_at is None:
            values["first_response_at"] = now
        if ticket.owner_id is None:
            values["owner_id"] = agent.id
            events.append(("assigned", {"agent": agent.id, "by": "first reply"}))
        await session.execute(update(Ticket).where(Ticket.id == ticket.id).values(**values))
        return events

    async def _commands(self, session: AsyncSession, agent: AgentIdentity,
                        parsed: ParsedCommands, ticket: Ticket, now: datetime) -> Events:
        """Apply each command; what cannot be applied is reported to the agent, not sent."""
        problems = [f"unknown command {u}" for u in parsed.unknown] + list(parsed.errors)
        events: Events = []
        by = f"agent {agent.email}"
        for command in parsed.commands:
            try:
                events += await self._command(session, agent, command, ticket, now, by)
            except DeskgateError as exc:
                problems.append(f"#{command.name}: {exc}")
        if problems:
            events.append(("commands_rejected", {"agent": agent.email, "problems": problems}))
            await self._notice(session, agent, ticket, "commands", now, lines=problems)
        return events

    async def _command(self, session: AsyncSession, agent: AgentIdentity, command: Command,
                       ticket: Ticket, now: datetime, by: str) -> Events:
        name, args = command.name, command.args
        if name in ("note", "force"):
            return []
        if name in STATUS_COMMANDS:
            on_close = self.rating.on_closed if name == "close" else None
            await change_status(session, self.settings, ticket.number, STATUS_COMMANDS[name],
                                now, by, on_close)
            return []  # change_status writes its own events
        if name == "priority":
            await change_priority(session, self.settings, ticket.number, args[0], now, by)
            return []
        if name == "assign":
            owner = await self._assignee(session, args[0] if args else "", ticket)
            await session.execute(update(Ticket).where(Ticket.id == ticket.id).values(
                owner_id=owner, updated_at=now))
            return [("assigned", {"agent": owner, "by": by})]
        if name == "tag":
            tags = list(dict.fromkeys([*(ticket.tags or []), *args]))
            await session.execute(update(Ticket).where(Ticket.id == ticket.id).values(
                tags=tags, updated_at=now))
            return [("tagged", {"tags": list(args), "by": by})]
        if name == "set":
            key, _, value = (args[0] if args else "").partition("=")
            if not key.strip():
                raise DeskgateError("use #set field=value")
            fields = dict(ticket.custom_fields or {}) | {key.strip(): value.strip()}
            await session.execute(update(Ticket).where(Ticket.id == ticket.id).values(
                custom_fields=fields, updated_at=now))
            return [("field_set", {"field": key.strip(), "value": value.strip(), "by": by})]
        raise DeskgateError("not supported")

    async def _assignee(self, session: AsyncSession, who: str, ticket: Ticket) -> int:
        who = who.strip().lower()
        if not who:
            raise DeskgateError("name an agent: #assign someone@example.com")
        row = (await session.execute(select(Agent.id, Agent.profile, Agent.active).where(
            (func.lower(Agent.email) == who) | (func.lower(Agent.name) == who)))).first()
        if row is None or not row[2]:
            raise DeskgateError(f"there is no active agent {who!r}")
        slug = await self._slug(session, ticket)
        member = await session.scalar(select(AgentDepartment.agent_id).join(
            Department, Department.id == AgentDepartment.department_id).where(
            AgentDepartment.agent_id == row[0], Department.slug == slug))
        if member is None and row[1] not in ("administrator", "support_manager"):
            raise DeskgateError(f"{who} is not an agent of the department {slug!r}")
        return int(row[0])

    async def _answered(self, session: AsyncSession, m: _Mail) -> _Answered:
        """Threading order of DESIGN 4 for an agent (a trusted sender), and which customer
        mail is being answered: a reply to a notification answers the mail it announced."""
        mail = m.mail
        ids = [*mail.in_reply_to, *reversed(mail.references)]
        routes = [self.pipeline.route(r) for r in m.envelope.rcpt_tos]
        token = next((r for r in routes if r.kind is RouteKind.REPLY), None)
        by_token = await repo.ticket_ref(session, token.ticket_number) \
            if token is not None and token.ticket_number is not None else None
        tag = find_tag(mail.subject, self.pipeline.tag)
        by_tag = await repo.ticket_ref(session, tag) if tag is not None else None
        decision = thread(mail, ThreadEvidence(
            await repo.tickets_by_message_ids(session, ids), by_token, by_tag, True), True)
        if decision.ticket is None:
            return _Answered(None, None, None, ())
        ticket_id = decision.ticket.id
        found = {row.message_id: row for row in await session.scalars(select(Message).where(
            Message.ticket_id == ticket_id, Message.message_id.in_(ids[:100])))} if ids else {}
        target = next((found[i] for i in ids if i in found), None)
        if target is not None and target.direction == "out" and target.in_reply_to:
            announced = await session.scalar(select(Message).where(
                Message.ticket_id == ticket_id, Message.direction == "in",
                Message.message_id == target.in_reply_to[0]).limit(1))
            target = announced or target
        if target is None or target.direction != "in":
            target = await session.scalar(select(Message).where(
                Message.ticket_id == ticket_id, Message.direction == "in")
                .order_by(Message.id.desc()).limit(1)) or target
        if target is None:
            return _Answered(decision.ticket, None, None, ())
        refs = tuple(r for r in (*target.references, target.message_id) if r)
        return _Answered(decision.ticket, target.id, target.message_id, refs)

    async def _other_reply(self, session: AsyncSession, agent: AgentIdentity,
                           answered: _Answered) -> tuple[str, str] | None:
        """Another agent's answer to the customer after the message being answered."""
        assert answered.ticket is not None
        query = select(Agent.name, Message.text).join(Agent, Agent.id == Message.agent_id).where(
            Message.ticket_id == answered.ticket.id, Message.kind == "agent_reply",
            Message.agent_id != agent.id)
        if answered.message_pk is not None:
            query = query.where(Message.id > answered.message_pk)
        row = (await session.execute(query.order_by(Message.id.desc()).limit(1))).first()
        return (row[0], row[1]) if row else None

    def _new_ticket_department(self, agent: AgentIdentity, routes: Sequence[Any]) -> str | None:
        """A department address in copy wins; else the agent's first department."""
        for route in routes:
            if route.kind in (RouteKind.DEPARTMENT, RouteKind.REPLY) and route.department:
                return str(route.department)
        return next((slug for slug in self.departments if slug in agent.departments), None)

    async def _new_ticket(self, session: AsyncSession, agent: AgentIdentity, m: _Mail,
                          customer: str, slug: str, now: datetime) -> Ticket:
        dept = self.departments[slug]
        contact_id = await repo.upsert_contact(session, customer, "", now)
        priority = dept.sla.priority_for(customer, m.mail.subject)
        due = due_dates(now, dept.sla.targets.get(priority), dept.sla.hours)
        return await repo.add(session, Ticket(
            number=await repo.next_ticket_number(session),
            department_id=self.pipeline.department_ids.get(slug)
            or await repo.department_id(session, slug),
            contact_id=contact_id,
            subject=(m.commands.subject or m.mail.subject)[:2000] or "(no subject)",
            status="open", priority=priority, channel="agent", language=dept.language,
            tags=[], custom_fields={}, owner_id=agent.id, created_at=now, updated_at=now,
            first_response_due_at=due.first_response_due_at, due_at=due.due_at))

    async def _share_note(self, session: AsyncSession, agent: AgentIdentity, m: _Mail,
                          ticket: Ticket, now: datetime) -> list[int]:
        """An internal note goes to the department's other agents, never to the customer."""
        slug = await self._slug(session, ticket)
        rows = await session.execute(select(Agent.id, Agent.email, Agent.name).join(
            AgentDepartment, AgentDepartment.agent_id == Agent.id).join(
            Department, Department.id == AgentDepartment.department_id).where(
            Department.slug == slug, Agent.active.is_(True), Agent.id != agent.id))
        shared = []
        for agent_id, email, name in rows.all():
            colleague = AgentIdentity(agent_id, email, name, agent.profile, frozenset())
            await self._notice(session, colleague, ticket, "note", now, quoted=m.text,
                               author=agent.name)
            shared.append(agent_id)
        return shared

    async def _notice(self, session: AsyncSession, to: AgentIdentity, ticket: Ticket,
                      notice: str, now: datetime, lines: Sequence[str] = (),
                      quoted: str = "", author: str = "") -> int:
        """A mail to an agent about their mail or their ticket, in the department's language."""
        dept = self.departments[await self._slug(session, ticket)]
        tag = self.settings.tickets.tag_format.format(number=ticket.number)
        rendered: Rendered = self.renderer.render("agent_notice", dept.language, {
            "agent_name": to.name, "department": dept.name, "ticket_number": ticket.number,
            "tag": tag, "notice": notice, "lines": list(lines), "quoted": quoted,
            "author": author}, department=dept.slug)
        sender, secret = dept.addresses[0], self.settings.tickets.reply_token_secret
        composed = compose(rendered, Outgoing(
            from_addr=sender, from_name=dept.name, to=to.email, hostname=self.settings.hostname,
            date=now, reply_to=reply_address(sender, ticket.number, secret),
            auto_submitted="auto-generated", language=dept.language))
        row = await queue.enqueue(session, kind="agent_notice", from_addr=sender, to=to.email,
                                  message_id=composed.message_id, mime=composed.mime, now=now,
                                  ticket_id=ticket.id)
        self.queued()
        return int(row.id)

    async def _slug(self, session: AsyncSession, ticket: Ticket) -> str:
        """The ticket's department: the pipeline knows every configured one's id already."""
        for slug, department_id in self.pipeline.department_ids.items():
            if department_id == ticket.department_id:
                return slug
        slug = await session.scalar(select(Department.slug).where(
            Department.id == ticket.department_id))
        assert slug is not None
        return str(slug)

    @staticmethod
    async def _agent_addresses(addresses: Sequence[str], session: AsyncSession
                               ) -> frozenset[str]:
        if not addresses:
            return frozenset()
        found = await session.scalars(select(func.lower(Agent.email)).where(
            func.lower(Agent.email).in_([a.lower() for a in addresses])))
        return frozenset(found)


def _html(text: str) -> Markup:
    """The agent's plain text as HTML paragraphs, escaped (no markup from the mail passes)."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    return Markup("\n".join("<p>" + html.escape(p).replace("\n", "<br>\n") + "</p>"
                            for p in paragraphs))
