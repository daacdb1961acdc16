"""CLI for the outbound side: outbox, address verification, DKIM keys, templates, the catcher."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.errors import DeskgateError
from gateway.outbound import dkim, queue, verify
from gateway.outbound.render import EVENTS, SHIPPED, Renderer
from gateway.output import print_json, print_table
from gateway.settings import Settings
from store import repo
from store.engine import Store

DEV_CONFIG_NAME = "deskgate.dev.toml"
STATES = ("queued", "retry", "sending", "sent", "failed", "held", "shunted", "bounced",
          "approval")


async def _store_work(settings: Settings, work: Any) -> int:
    store = Store(settings.database_url)
    try:
        async with store.transaction() as session:
            return int(await work(session))
    finally:
        await store.dispose()


async def cmd_outbox(settings: Settings, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)

    async def work(session: Any) -> int:
        if args.action == "list":
            rows = await queue.listing(session, args.state)
            print_json(rows) if args.json else print_table(rows, [
                "id", "state", "kind", "to", "attempts", "next_attempt_at", "last_error"])
            return 0
        if args.action == "approve":
            print(f"outbox row {args.id}: {await queue.approve(session, args.id, now)}")
            return 0
        states = ("failed", "bounced", "retry") if args.action == "retry" else ("shunted",)
        if not await queue.requeue(session, args.id, states, now):
            raise DeskgateError(f"outbox row {args.id} is not {' or '.join(states)}")
        print(f"outbox row {args.id} queued again")
        return 0

    return await _store_work(settings, work)


async def cmd_address(settings: Settings, args: argparse.Namespace) -> int:
    now = datetime.now(UTC)

    async def work(session: Any) -> int:
        await repo.sync_departments(session, settings.departments)  # config addresses exist
        if args.action == "list":
            rows = await verify.listing(session)
            print_json(rows) if args.json else print_table(
                rows, ["email", "department", "state", "verified_at"])
            return 0
        if args.action == "add":
            if args.department not in {d.slug for d in settings.departments}:
                raise DeskgateError(f"there is no department {args.department!r} in "
                                    f"{settings.source}")
            if settings.department_of(args.email) is None:
                print(f"note: add {args.email} to the addresses of [[departments]] "
                      f"{args.department} in the config, or deskgate refuses mail to it "
                      "(the code comes back that way)", file=sys.stderr)
        row = await verify.start(session, settings, Renderer(dict(
            settings.outbound.template_dirs)), args.email, getattr(args, "department", None),
            now)
        print(f"{args.email.lower()}: pending; a code was queued to it (outbox row {row}). "
              "It is verified when that mail comes back in through the forwarding route.")
        return 0

    return await _store_work(settings, work)


async def cmd_dkim(settings: Settings, args: argparse.Namespace) -> int:
    key = dkim.generate(args.algorithm)
    path = Path(args.out or f"{args.domain}.{args.selector}.key")
    if path.exists() and not args.force:
        raise DeskgateError(f"{path} exists; pass --force to replace it")
    dkim.write_key(path, key)
    print(f"private key written to {path} (mode 600); add to the config:\n"
          f'  [[dkim.keys]]\n  domain = "{args.domain}"\n  selector = "{args.selector}"\n'
          f'  algorithm = "{args.algorithm}"\n  key_file = "{path.resolve()}"\n'
          f"publish this DNS TXT record:\n"
          f'{dkim.record_name(args.selector, args.domain)}. IN TXT "{key.dns_value}"')
    return 0


async def cmd_render(settings: Settings, args: argparse.Namespace) -> int:
    rendered = Renderer(dict(settings.outbound.template_dirs)).render(
        args.event, args.lang, _sample(args.event), department=args.department)
    print(f"Subject: {rendered.subject}\n\n{rendered.text}")
    if args.html:
        print(f"--- text/html ---\n{rendered.html}")
    return 0


def _sample(event: str) -> dict[str, Any]:
    from gateway.outbound.render import SAMPLES

    return SAMPLES[event]


async def cmd_catch(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.outbound.catcher import run_catcher

    host, _, port = args.listen.rpartition(":")
    if not port.isdigit():
        raise DeskgateError(f"--listen must look like HOST:PORT, not {args.listen!r}")
    try:
        await run_catcher(host or "127.0.0.1", int(port), Path(args.dir))
    except OSError as exc:
        raise DeskgateError(f"cannot listen on {args.listen}: {exc.strerror}") from None
    return 0


def check_dev_flags(settings: Settings) -> list[str]:
    """check-config: the [dev] conveniences belong to the dev config only."""
    dev = settings.outbound.dev
    if dev.enabled and Path(settings.source).name != DEV_CONFIG_NAME:
        return [f"{settings.source}: dev: bootstrap/catch are for {DEV_CONFIG_NAME} only "
                "(they trust unverified addresses and generate keys)"]
    return []


def add_parsers(sub: Any) -> None:
    outbox = sub.add_parser("outbox", help="outgoing mail").add_subparsers(dest="action",
                                                                           required=True)
    listing = outbox.add_parser("list", help="outbox rows, newest first")
    listing.add_argument("--state", choices=STATES)
    listing.add_argument("--json", action="store_true")
    retry = outbox.add_parser("retry", help="send a failed row again now")
    replay = outbox.add_parser("replay", help="send a shunted row again after a fix")
    approve = outbox.add_parser("approve", help="send a newbie agent's reply (state approval)")
    for parser in (retry, replay, approve):
        parser.add_argument("id", type=int)
    for parser in (listing, retry, replay, approve):
        parser.set_defaults(run=cmd_outbox)
    address = sub.add_parser("address", help="reply-from addresses").add_subparsers(
        dest="action", required=True)
    add = address.add_parser("add", help="add an address; a code is mailed to it")
    add.add_argument("email")
    add.add_argument("--department", required=True, metavar="SLUG")
    alist = address.add_parser("list", help="addresses and their verification state")
    alist.add_argument("--json", action="store_true")
    again = address.add_parser("verify", help="mail a new code to an address")
    again.add_argument("email")
    for parser in (add, alist, again):
        parser.set_defaults(run=cmd_address)
    _tool_parsers(sub)


def _tool_parsers(sub: Any) -> None:
    catch = sub.add_parser("catch", help="capture relay for development: mails become .eml files")
    catch.add_argument("--listen", default="127.0.0.1:2526", metavar="HOST:PORT")
    catch.add_argument("--dir", default="var/caught")
    catch.set_defaults(run=cmd_catch)
    keys = sub.add_parser("dkim", help="DKIM keys").add_subparsers(dest="action", required=True)
    keygen = keys.add_parser("keygen", help="write a key and print its DNS record")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--algorithm", choices=dkim.ALGORITHMS, default="rsa-sha256")
    keygen.add_argument("--out", metavar="FILE", help="default: DOMAIN.SELECTOR.key")
    keygen.add_argument("--force", action="store_true")
    keygen.set_defaults(run=cmd_dkim)
    render = sub.add_parser("render", help="print a template filled with sample values")
    render.add_argument("event", choices=EVENTS)
    render.add_argument("--lang", choices=SHIPPED, default="en")
    render.add_argument("--department", metavar="SLUG", help="use its template folder")
    render.add_argument("--html", action="store_true")
    render.set_defaults(run=cmd_render)
