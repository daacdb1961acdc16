"""`deskgate rules test` and `deskgate account …`: the operator's view of routing (issue 13)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from gateway.errors import DeskgateError, NotFound
from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Pipeline
from gateway.output import print_json
from gateway.settings import Settings
from store import queries, repo
from store.engine import Store
from store.models import Account, AccountDomain, Contact, Ticket


async def cmd_rules_test(settings: Settings, args: argparse.Namespace) -> int:
    try:
        raw = Path(args.mail).read_bytes()
    except OSError as exc:
        raise DeskgateError(f"{args.mail}: cannot be read: {exc.strerror}") from None
    recipient = args.recipient or settings.departments[0].addresses[0]
    store = Store(settings.database_url)
    try:
        result = await Pipeline(settings, store).dry_run(
            raw, Envelope(mail_from=args.sender, rcpt_tos=(recipient,), channel="dry-run"))
    finally:
        await store.dispose()
    if args.json:
        print_json(result)
        return 0
    print(f"{args.mail} to {recipient}: {result['outcome']} ({result.get('reason') or ''})")
    for key in ("kind", "sender", "classification", "rules_fired", "rule_errors", "ticket"):
        if result.get(key):
            print(f"  {key}: {result[key]}")
    for key, value in (result.get("new_ticket") or {}).items():
        print(f"  new ticket {key}: {value}")
    return 0


async def cmd_account(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(settings.database_url)
    try:
        async with store.transaction() as session:
            if args.action == "add":
                await _add(session, args.name, [d.lower() for d in args.domain])
                print(f"account {args.name}: {', '.join(args.domain)}")
                return 0
            if args.action == "list":
                rows = await _list(session)
                print_json(rows) if args.json else [print(f"{r['name']}: {', '.join(r['domains'])}")
                                               for r in rows]
                return 0
            detail = await _show(session, args.name)
    finally:
        await store.dispose()
    if args.json:
        print_json(detail)
    else:
        print(f"Account {detail['name']}: {', '.join(detail['domains'])}")
        for contact in detail["contacts"]:
            print(f"  contact {contact}")
        for ticket in detail["tickets"]:
            print(f"  ticket {ticket['number']} [{ticket['status']}] {ticket['subject']}")
    return 0


async def _add(session: Any, name: str, domains: list[str]) -> None:
    """Name a company and claim its domains, even from an account made automatically."""
    account_id = await repo.ensure_account(session, name, [], datetime.now(UTC))
    for domain in domains:
        await session.execute(update(AccountDomain).where(AccountDomain.domain == domain)
                              .values(account_id=account_id))
        await repo.ensure_account(session, name, [domain], datetime.now(UTC))
        await repo.link_contacts_to_account(session, account_id, domain)


async def _list(session: Any) -> list[dict[str, Any]]:
    rows = await session.execute(select(Account.name, AccountDomain.domain).outerjoin(
        AccountDomain, AccountDomain.account_id == Account.id).order_by(Account.name))
    accounts: dict[str, list[str]] = {}
    for name, domain in rows:
        accounts.setdefault(name, []).extend([domain] if domain else [])
    return [{"name": name, "domains": domains} for name, domains in accounts.items()]


async def _show(session: Any, name: str) -> dict[str, Any]:
    account = await session.scalar(select(Account).where(Account.name == name))
    if account is None:
        raise NotFound(f"there is no account {name!r}")
    domains = list(await session.scalars(select(AccountDomain.domain).where(
        AccountDomain.account_id == account.id).order_by(AccountDomain.domain)))
    contacts = list(await session.scalars(select(Contact.email).where(
        Contact.account_id == account.id).order_by(Contact.email)))
    rows = await session.execute(queries.summary_query().where(  # joins contacts already
        Contact.account_id == account.id).order_by(Ticket.number))
    return {"name": account.name, "domains": domains, "contacts": contacts,
            "tickets": [queries.ticket_summary(*row) for row in rows]}


def add_parsers(sub: Any) -> None:
    rules = sub.add_parser("rules", help="routing rules").add_subparsers(dest="action",
                                                                          required=True)
    test = rules.add_parser("test", help="which rules match a mail, and what its ticket would "
                            "become; stores nothing")
    test.add_argument("mail", help="an .eml file")
    test.add_argument("--recipient", metavar="ADDR", help="default: the first department's")
    test.add_argument("--sender", metavar="ADDR", help="envelope sender (default: unknown)")
    test.add_argument("--json", action="store_true")
    test.set_defaults(run=cmd_rules_test)
    account = sub.add_parser("account", help="accounts (companies)").add_subparsers(
        dest="action", required=True)
    add = account.add_parser("add", help="name an account and give it its domains")
    add.add_argument("name")
    add.add_argument("--domain", action="append", required=True, metavar="D")
    listing = account.add_parser("list", help="accounts and their domains")
    listing.add_argument("--json", action="store_true")
    show = account.add_parser("show", help="an account with its contacts and tickets")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    for parser in (add, listing, show):
        parser.set_defaults(run=cmd_account)
