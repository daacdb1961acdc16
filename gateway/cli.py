"""deskgate command line: parses arguments, calls the parts, prints; no business logic."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from gateway import cli_agents, cli_imap, cli_rules, logs
from gateway.errors import ConfigError, DeskgateError, StoreUnavailable
from gateway.ingest.model import Envelope
from gateway.ingest.pipeline import Outcome, Pipeline
from gateway.outbound import commands as outbound_commands
from gateway.outbound.rating import RatingMail
from gateway.outbound.render import Renderer
from gateway.output import print_json, print_table
from gateway.settings import Settings, find_config, load_settings
from gateway.tickets import actions
from gateway.tickets.lifecycle import Status
from gateway.tickets.sla_config import PRIORITIES
from store import blobs, queries
from store.engine import Store
from store.migrate import upgrade
from store.models import Quarantine

EX_NOUSER = 67  # sysexits.h: the MTA bounces the mail for this recipient
EX_TEMPFAIL = 75  # sysexits.h: the MTA keeps the mail and retries


async def _with_store(settings: Settings, work: Callable[[Store], Awaitable[int]]) -> int:
    store = Store(settings.database_url)
    try:
        return await work(store)
    finally:
        await store.dispose()


async def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.service import serve, supervise

    if args.workers > 1:
        return await supervise(settings.source, args.workers)
    await serve(settings, reuse_port=args.reuse_port)
    return 0


async def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        await upgrade(store)
        print(f"database is up to date ({store.engine.dialect.name})")
        return 0

    return await _with_store(settings, work)


async def cmd_deliver(settings: Settings, args: argparse.Namespace) -> int:
    raw = sys.stdin.buffer.read()
    envelope = Envelope(mail_from=_pipe_sender(args.sender, raw), rcpt_tos=tuple(args.recipient),
                        peer="pipe", channel="pipe")

    async def work(store: Store) -> int:
        pipeline = Pipeline(settings, store)
        await pipeline.start()
        verdict = await pipeline.ingest(raw, envelope)
        if verdict.outcome is Outcome.REJECTED:
            print(f"deskgate: {', '.join(args.recipient)}: no such address here", file=sys.stderr)
            return EX_NOUSER
        return 0

    try:
        return await _with_store(settings, work)
    except (StoreUnavailable, SQLAlchemyError, OSError) as exc:
        print(f"deskgate: temporary failure, the MTA will retry: {exc}", file=sys.stderr)
        return EX_TEMPFAIL


def _pipe_sender(given: str | None, raw: bytes) -> str | None:
    """--sender as the MTA passed it ("" is the null sender), else its Return-Path line."""
    if given is not None:
        return given.strip().strip("<>")
    head = raw[:raw.find(b"\n") + 1 or 4096]
    if head[:12].lower() == b"return-path:":
        return head[12:].decode("ascii", "replace").strip().strip("<>")
    return None


async def cmd_ticket(settings: Settings, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)

    async def work(store: Store) -> int:
        async with store.transaction() as session:
            if args.action == "list":
                rows = await queries.list_tickets(session, args.status, args.department,
                                                  overdue_at=now if args.overdue else None,
                                                  fields=_field_filters(args.field))
                print_json(rows) if args.json else print_table(rows, [
                    "number", "status", "priority", "department", "contact", "due_at",
                    "subject"])
                return 0
            if args.action == "show":
                detail = await queries.ticket_detail(session, args.number)
                print_json(detail) if args.json else _print_ticket(detail, args.full)
                return 0
            if args.action == "priority":
                await actions.change_priority(session, settings, args.number, args.priority,
                                              now, "cli")
                print(f"ticket {args.number}: priority {args.priority}")
                return 0
            target = Status.CLOSED if args.action == "close" else Status(args.status)
            rating = RatingMail(settings, Renderer(dict(settings.outbound.template_dirs)),
                                lambda: now)
            await actions.change_status(session, settings, args.number, target, now, "cli",
                                        on_close=rating.on_closed)
            print(f"ticket {args.number} {'closed' if args.action == 'close' else target.value}")
        return 0

    return await _with_store(settings, work)


def _body(message: dict[str, Any], full: bool) -> str:
    """What the customer newly wrote (issue 12); the whole text with --full or when the
    message predates the readable view."""
    text = message["text"] if full or message.get("visible_text") is None \
        else message["visible_text"]
    return text.rstrip() or "(no text)"


def _field_filters(pairs: list[str]) -> dict[str, str]:
    filters = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise DeskgateError(f"--field {pair!r}: write it as NAME=VALUE")
        filters[name] = value
    return filters


def _print_ticket(detail: dict[str, Any], full: bool = False) -> None:
    print(f"Ticket {detail['number']}: {detail['subject']}")
    print(f"  status {detail['status']} · department {detail['department']} · "
          f"contact {detail['contact']} · created {detail['created_at']}")
    print(f"  priority {detail['priority']} · first response due "
          f"{detail['first_response_due_at'] or '-'} · due {detail['due_at'] or '-'}")
    labels = {"category": detail.get("category"), "subcategory": detail.get("subcategory"),
              "product": detail.get("product"), "tags": ", ".join(detail.get("tags") or []),
              **(detail.get("fields") or {})}
    if any(labels.values()):
        print("  " + " · ".join(f"{k} {v}" for k, v in labels.items() if v))
    if detail.get("follow_up_of"):
        print(f"  follow-up of ticket {detail['follow_up_of']}")
    for message in detail["thread"]:
        print(f"\n--- {message['direction']} {message['kind']} from {message['from']} "
              f"at {message['date'] or message['received_at']}")
        print(f"Subject: {message['subject']}")
        print(_body(message, full))
        for attachment in message["attachments"]:
            kept = "" if attachment["kept"] else f" (not kept: {attachment['not_kept_reason']})"
            print(f"  [attachment] {attachment['filename']} {attachment['content_type']} "
                  f"{attachment['size']} bytes{kept}")
    print("\nEvents:")
    for event in detail["events"]:
        print(f"  {event['at']}  {event['type']}  {json.dumps(event['data'], ensure_ascii=False)}")


async def cmd_contact(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        async with store.read() as session:
            detail = await queries.contact_detail(session, args.email)
        if args.json:
            print_json(detail)
        else:
            print(f"{detail['name'] or '(no name)'} <{detail['email']}>, "
                  f"known since {detail['created_at']}")
            print_table(detail["tickets"],
                        ["number", "status", "department", "messages", "subject"])
        return 0

    return await _with_store(settings, work)


async def cmd_quarantine(settings: Settings, args: argparse.Namespace) -> int:
    async def work(store: Store) -> int:
        if args.action == "list":
            async with store.read() as session:
                rows = await queries.list_quarantine(session, None if args.all else "held")
            print_json(rows) if args.json else print_table(
                rows, ["id", "state", "received_at", "envelope_from", "reason"])
            return 0
        async with store.read() as session:
            entry = await queries.quarantine_entry(session, args.id)
            raw = await blobs.read_raw(session, entry.raw_sha256)
            assert raw is not None  # a foreign key
        if args.action == "show":
            if args.raw:
                sys.stdout.buffer.write(raw)
            else:
                print_json(queries.quarantine_view(entry) | {"size": len(raw)})
            return 0
        return await _reprocess(settings, store, entry, raw)

    return await _with_store(settings, work)


async def _reprocess(settings: Settings, store: Store, entry: Quarantine, raw: bytes) -> int:
    """Run a held mail through today's pipeline; release it when it now makes a ticket."""
    pipeline = Pipeline(settings, store)
    await pipeline.start()
    envelope = Envelope(mail_from=entry.envelope_from, rcpt_tos=tuple(entry.envelope_to),
                        peer=entry.peer or "", channel="reprocess")
    verdict = await pipeline.ingest(raw, envelope)
    if verdict.ticket_number is None:
        print(f"quarantine entry {entry.id} stays held: {verdict.reason or verdict.outcome.value}")
        return 1
    async with store.transaction() as session:
        await session.execute(update(Quarantine).where(Quarantine.id == entry.id).values(
            state="released", released_to_ticket=verdict.ticket_number))
    print(f"quarantine entry {entry.id} released to ticket {verdict.ticket_number}")
    return 0


async def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.doctor import run_checks

    async def work(store: Store) -> int:
        checks = await run_checks(settings, store)
        for check in checks:
            print(check)
        return 1 if any(c.state == "FAIL" for c in checks) else 0

    return await _with_store(settings, work)


async def cmd_check_config(settings: Settings, args: argparse.Namespace) -> int:
    if problems := outbound_commands.check_dev_flags(settings):
        raise ConfigError(problems)
    addresses = sum(len(d.addresses) for d in settings.departments)
    print(f"{settings.source}: OK: {len(settings.departments)} departments, {addresses} "
          f"addresses, inbound SMTP on {settings.inbound.listen}, "
          f"database {settings.database_url.split(':', 1)[0]}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deskgate")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deskgate", description="Helpdesk email gateway.")
    parser.add_argument("--version", action="version", version=f"deskgate {_version()}")
    parser.add_argument("--config", help="configuration file (default: $DESKGATE_CONFIG, "
                        "/etc/deskgate/deskgate.toml, ./config/deskgate.dev.toml)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="run N processes sharing the inbound port (default: 1)")
    serve.add_argument("--reuse-port", action="store_true",
                       help="listen with SO_REUSEPORT, so other deskgate processes can share it")
    serve.set_defaults(run=cmd_serve)
    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("path", nargs="?", help="file to check (default: --config)")
    check.set_defaults(run=cmd_check_config)
    sub.add_parser("doctor", help="check a live setup: database, addresses, relay, DKIM/DNS"
                   ).set_defaults(run=cmd_doctor)
    db = sub.add_parser("db", help="database schema").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(run=cmd_db_upgrade)
    deliver = sub.add_parser("deliver", help="ingest one mail from stdin (MTA pipe delivery)")
    deliver.add_argument("--recipient", action="append", required=True, metavar="ADDR")
    deliver.add_argument("--sender", metavar="ADDR",
                         help="envelope sender (\"\" for <>; default: the Return-Path line)")
    deliver.set_defaults(run=cmd_deliver)
    _ticket_parser(sub)
    report = sub.add_parser("report", help="reports").add_subparsers(dest="action", required=True)
    sla = report.add_parser("sla", help="share of tickets meeting their SLA targets")
    sla.add_argument("--since", metavar="YYYY-MM-DD",
                     help="tickets created since (default: 30 days)")
    sla.add_argument("--json", action="store_true")
    sla.set_defaults(run=cmd_report)
    csat = report.add_parser("csat", help="satisfaction ratings: counts, Good share, comments")
    csat.add_argument("--by", choices=["department", "agent"], default="department")
    tickets = report.add_parser("tickets", help="new, reopened, closed, median first response")
    for report_parser in (csat, tickets):
        report_parser.add_argument("--since", metavar="YYYY-MM-DD",
                                   help="since this day (default: 30 days)")
        report_parser.add_argument("--json", action="store_true")
        report_parser.set_defaults(run=cmd_report)
    contact = sub.add_parser("contact", help="contacts").add_subparsers(dest="action",
                                                                        required=True)
    show = contact.add_parser("show", help="a contact and all their tickets")
    show.add_argument("email")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=cmd_contact)
    _quarantine_parser(sub)
    cli_rules.add_parsers(sub)
    cli_agents.add_parsers(sub)
    cli_imap.add_parsers(sub)
    outbound_commands.add_parsers(sub)  # outbox, address, catch, dkim, render (issue 4)
    return parser


async def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    try:
        since = datetime.fromisoformat(args.since).replace(tzinfo=UTC) if args.since \
            else now - timedelta(days=30)
    except ValueError:
        raise DeskgateError(f"--since {args.since!r}: write a date like 2026-11-01") from None

    async def work(store: Store) -> int:
        async with store.read() as session:
            if args.action == "csat":
                rows = await queries.csat_report(session, since, args.by)
            elif args.action == "tickets":
                rows = await queries.tickets_report(session, since)
            else:
                rows = await queries.sla_report(session, since, now)
        if args.json:
            print_json(rows)
            return 0
        if args.action != "sla":
            _print_report(args.action, rows, args.by if args.action == "csat" else "")
            return 0
        print(f"SLA since {since.date().isoformat()}")
        print_table([{"department": r["department"], "priority": r["priority"],
                 "tickets": r["tickets"], **{f"{t}_met": _share(r[t]) for t in
                                             ("first_response", "resolution")}} for r in rows],
               ["department", "priority", "tickets", "first_response_met", "resolution_met"])
        return 0

    return await _with_store(settings, work)


def _print_report(kind: str, rows: list[dict[str, Any]], by: str) -> None:
    if kind == "tickets":
        print_table(rows, ["department", "new", "reopened", "closed", "median_first_response_min"])
        return
    print_table([r | {"score": "-" if r["score"] is None else f"{r['score']:.0%}"} for r in rows],
           [by, "ratings", "good", "okay", "bad", "score"])
    for row in rows:
        for item in row["comments"]:
            print(f"  #{item['ticket']} {item['value']}: {item['comment']}")


def _share(counts: dict[str, Any]) -> str:
    share = counts["met_share"]
    pending = f", {counts['pending']} pending" if counts["pending"] else ""
    return "-" if share is None else f"{share:.0%} ({counts['met']}/" \
        f"{counts['met'] + counts['breached']}{pending})"


def _ticket_parser(sub: Any) -> None:
    ticket = sub.add_parser("ticket", help="tickets").add_subparsers(dest="action", required=True)
    listing = ticket.add_parser("list", help="list tickets, newest first")
    listing.add_argument("--status", choices=[s.value for s in Status])
    listing.add_argument("--department", metavar="SLUG")
    listing.add_argument("--field", action="append", default=[], metavar="NAME=VALUE",
                         help="only tickets whose custom field has this value")
    listing.add_argument("--overdue", action="store_true",
                         help="only open tickets past a first-response or resolution due date")
    listing.add_argument("--json", action="store_true")
    show = ticket.add_parser("show", help="the whole thread and timeline of a ticket")
    show.add_argument("number", type=int)
    show.add_argument("--json", action="store_true")
    show.add_argument("--full", action="store_true",
                      help="whole texts, quoted history and signatures included")
    close = ticket.add_parser("close", help="close a ticket")
    close.add_argument("number", type=int)
    status = ticket.add_parser("status", help="set a status (on_hold and waiting pause the SLA)")
    status.add_argument("number", type=int)
    status.add_argument("status", choices=[s.value for s in Status])
    priority = ticket.add_parser("priority", help="set the priority; due dates follow it")
    priority.add_argument("number", type=int)
    priority.add_argument("priority", choices=list(PRIORITIES))
    for parser in (listing, show, close, status, priority):
        parser.set_defaults(run=cmd_ticket)


def _quarantine_parser(sub: Any) -> None:
    quarantine = sub.add_parser("quarantine", help="mail kept aside for review").add_subparsers(
        dest="action", required=True)
    listing = quarantine.add_parser("list", help="held entries")
    listing.add_argument("--all", action="store_true", help="include released entries")
    listing.add_argument("--json", action="store_true")
    show = quarantine.add_parser("show", help="one entry")
    show.add_argument("id", type=int)
    show.add_argument("--raw", action="store_true", help="write the raw mail to stdout")
    reprocess = quarantine.add_parser("reprocess", help="run an entry through the pipeline again")
    reprocess.add_argument("id", type=int)
    for parser in (listing, show, reprocess):
        parser.set_defaults(run=cmd_quarantine)


def _settings_for(args: argparse.Namespace) -> Settings:
    if args.command == "check-config" and args.path:
        from pathlib import Path

        return load_settings(Path(args.path))
    return load_settings(find_config(args.config))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_for(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"deskgate: config: {problem}", file=sys.stderr)
        return EX_TEMPFAIL if args.command == "deliver" else exc.exit_code
    logs.configure(settings.log_level if args.command == "serve" else "warning")
    try:
        return asyncio.run(args.run(settings, args))
    except KeyboardInterrupt:
        return 130
    except DeskgateError as exc:
        print(f"deskgate: {exc}", file=sys.stderr)
        return exc.exit_code
    except SQLAlchemyError as exc:
        print(f"deskgate: database error ({type(exc).__name__}): "
              f"{str(getattr(exc, 'orig', exc)).splitlines()[0][:300]}; is the database "
              "reachable and up to date (`deskgate db upgrade`)?", file=sys.stderr)
        return EX_TEMPFAIL if args.command == "deliver" else 1
    except Exception as exc:  # a bug: one readable line, the traceback only on request
        if os.environ.get("DESKGATE_DEBUG"):
            raise
        print(f"deskgate: internal error: {type(exc).__name__}: {exc} "
              "(set DESKGATE_DEBUG=1 for the traceback)", file=sys.stderr)
        return EX_TEMPFAIL if args.command == "deliver" else 70


if __name__ == "__main__":
    sys.exit(main())
