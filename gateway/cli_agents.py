"""`deskgate agent …`: invite agents, set their profile and departments, disable them."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.agents import Profile
from gateway.errors import DeskgateError, NotFound
from gateway.ingest.identify import normalize_address
from gateway.outbound import queue
from gateway.outbound.compose import Outgoing, compose
from gateway.outbound.render import Renderer
from gateway.output import print_json
from gateway.settings import Settings
from gateway.tickets.assignment import pick_owner
from gateway.web.tokens import link_keys, sign
from store import repo
from store.engine import Store
from store.models import Agent, AgentDepartment, Department, Ticket

INVITE_VALID = timedelta(days=7)


def invite_url(settings: Settings, agent_id: int, now: datetime) -> str:
    token = sign("invite", str(agent_id), now + INVITE_VALID,
                 link_keys(settings.tickets.reply_token_secret))
    return f"{settings.web_links.base_url}/invite/{token}"


async def _agent(session: AsyncSession, email: str) -> Agent:
    agent = await session.scalar(select(Agent).where(Agent.email == email.lower()))
    if agent is None:
        raise NotFound(f"there is no agent {email}")
    return agent


async def _department_ids(session: AsyncSession, settings: Settings, slugs: list[str]
                          ) -> list[int]:
    known = {d.slug for d in settings.departments}
    for slug in slugs:
        if slug not in known:
            raise DeskgateError(f"department {slug!r} is not in the config "
                                f"({', '.join(sorted(known))})")
    ids = await repo.sync_departments(session, settings.departments)  # the daemon may not
    return [ids[slug] for slug in slugs]                               # have run yet


async def _invite(session: AsyncSession, settings: Settings, args: argparse.Namespace,
                  now: datetime) -> str:
    email = normalize_address(args.email)
    if email is None:
        raise DeskgateError(f"{args.email!r} is not an e-mail address")
    if await session.scalar(select(Agent.id).where(Agent.email == email)):
        raise DeskgateError(f"{email} is already an agent")
    department_ids = await _department_ids(session, settings, args.department)
    agent = await repo.add(session, Agent(email=email, name=args.name, profile=args.profile,
                                          active=True, created_at=now))
    for department_id in department_ids:
        session.add(AgentDepartment(agent_id=agent.id, department_id=department_id))
    dept = next(d for d in settings.departments if d.slug == args.department[0])
    url = invite_url(settings, agent.id, now)
    rendered = Renderer(dict(settings.outbound.template_dirs)).render("invite", dept.language, {
        "agent_name": args.name, "department": dept.name, "invite_url": url},
        department=dept.slug)
    composed = compose(rendered, Outgoing(from_addr=dept.addresses[0], from_name=dept.name,
                                          to=email, hostname=settings.hostname, date=now,
                                          auto_submitted="auto-generated",
                                          language=dept.language))
    row = await queue.enqueue(session, kind="invite", from_addr=dept.addresses[0], to=email,
                              message_id=composed.message_id, mime=composed.mime, now=now)
    note = f" (outbox {row.id}, {row.state})"
    return f"invited {email} as {args.profile}{note}" + (f"\n{url}" if args.print_link else "")


async def _view(session: AsyncSession, agent: Agent) -> dict[str, Any]:
    slugs = list(await session.scalars(select(Department.slug).join(
        AgentDepartment, AgentDepartment.department_id == Department.id).where(
        AgentDepartment.agent_id == agent.id).order_by(Department.slug)))
    owned = await session.scalar(select(Ticket.id).where(
        Ticket.owner_id == agent.id, Ticket.status != "closed").limit(1))
    return {"email": agent.email, "name": agent.name, "profile": agent.profile,
            "active": agent.active, "departments": slugs,
            "password_set": agent.credential_hash is not None, "owns_open_tickets": bool(owned),
            "created_at": agent.created_at.isoformat()}


async def _change(session: AsyncSession, settings: Settings, args: argparse.Namespace,
                  now: datetime) -> str:
    agent = await _agent(session, args.email)
    if args.action == "disable":
        agent.active = False
        await session.flush()
        moved = await _reassign(session, settings, agent, now)
        given = sum(1 for owner in moved if owner is not None)
        return (f"disabled {agent.email}; {len(moved)} open ticket(s): {given} reassigned, "
                f"{len(moved) - given} unowned")
    if args.action == "set-profile":
        agent.profile = args.profile
        return f"{agent.email} is now {args.profile}"
    ids = await _department_ids(session, settings, args.department)
    if args.action == "grant":
        for department_id in ids:
            await session.execute(repo.insert_ignore(session, AgentDepartment).values(
                agent_id=agent.id, department_id=department_id))
        return f"{agent.email} may now act in {', '.join(args.department)}"
    await session.execute(delete(AgentDepartment).where(
        AgentDepartment.agent_id == agent.id, AgentDepartment.department_id.in_(ids)))
    return f"{agent.email} may no longer act in {', '.join(args.department)}"


async def _reassign(session: AsyncSession, settings: Settings, agent: Agent, now: datetime
                    ) -> list[int | None]:
    """A disabled agent's open tickets go to the department's strategy, or back to the queue."""
    strategies = {d.slug: d.assignment for d in settings.departments}
    owned = (await session.execute(select(Ticket.id, Ticket.department_id, Department.slug)
                                   .join(Department, Department.id == Ticket.department_id)
                                   .where(Ticket.owner_id == agent.id,
                                          Ticket.status != "closed"))).all()
    owners = []
    for ticket_id, department_id, slug in owned:
        owner = pick_owner(strategies.get(slug, "none"),
                           await repo.assignment_candidates(session, department_id))
        await session.execute(update(Ticket).where(Ticket.id == ticket_id).values(owner_id=owner))
        await repo.add_events(session, ticket_id, now, [(
            "owner_changed", {"from": agent.email, "to": owner, "reason": "agent disabled"})])
        owners.append(owner)
    return owners


async def cmd_agent(settings: Settings, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    store = Store(settings.database_url)
    try:
        async with store.transaction() as session:
            if args.action == "invite":
                print(await _invite(session, settings, args, now))
            elif args.action == "list":
                rows = [await _view(session, a) for a in await session.scalars(
                    select(Agent).order_by(Agent.email))]
                _output(rows, args.json)
            elif args.action == "show":
                _output(await _view(session, await _agent(session, args.email)), args.json)
            else:
                print(await _change(session, settings, args, now))
    finally:
        await store.dispose()
    return 0


def _output(data: Any, as_json: bool) -> None:
    if as_json:
        print_json(data)
        return
    for row in data if isinstance(data, list) else [data]:
        state = "active" if row["active"] else "disabled"
        print(f"{row['email']:32} {row['name']:20} {row['profile']:16} {state:8} "
              f"{','.join(row['departments'])}")


def add_parsers(sub: Any) -> None:
    agent = sub.add_parser("agent", help="agents").add_subparsers(dest="action", required=True)
    profiles = [p.value for p in Profile]
    invite = agent.add_parser("invite", help="add an agent and mail them an invitation")
    invite.add_argument("email")
    invite.add_argument("--name", required=True)
    invite.add_argument("--profile", choices=profiles, default=Profile.AGENT.value)
    invite.add_argument("--department", action="append", required=True, metavar="SLUG")
    invite.add_argument("--print-link", action="store_true",
                        help="also print the invitation link (when no relay is set up yet)")
    listing = agent.add_parser("list", help="all agents")
    show = agent.add_parser("show", help="one agent")
    show.add_argument("email")
    for parser in (listing, show):
        parser.add_argument("--json", action="store_true")
    disable = agent.add_parser("disable", help="no more logins; their open tickets are unowned")
    disable.add_argument("email")
    profile = agent.add_parser("set-profile", help="change an agent's profile")
    profile.add_argument("email")
    profile.add_argument("profile", choices=profiles)
    grant = agent.add_parser("grant", help="let an agent act in departments")
    revoke = agent.add_parser("revoke", help="take departments away from an agent")
    for parser in (grant, revoke):
        parser.add_argument("email")
        parser.add_argument("--department", action="append", required=True, metavar="SLUG")
    for parser in (invite, listing, show, disable, profile, grant, revoke):
        parser.set_defaults(run=cmd_agent)
