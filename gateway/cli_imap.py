"""`deskgate imap status` (how far each mailbox's import got) and `deskgate imap test NAME`
(can deskgate log in and read the folder now) (issue 7)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.inbound import imap_client
from gateway.inbound.imap import describe
from gateway.inbound.imap_oauth import TokenSource
from gateway.settings import Settings
from gateway.settings_imap import ImapSettings
from store import imap_checkpoints
from store.engine import Store


def status_rows(settings: Settings, rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Configured mailboxes first (a never-polled one still shows), then stale rows."""
    out = []
    for mailbox in settings.imap:
        row = rows.pop(mailbox.name, None)
        out.append({
            "name": mailbox.name, "configured": True, "department": mailbox.department,
            "server": f"{mailbox.host}:{mailbox.port}", "folder": mailbox.folder,
            "uidvalidity": row.uidvalidity if row else None,
            "last_uid": row.last_uid if row else None, "backlog": row.backlog if row else None,
            "last_error": row.last_error if row else None,
            "last_poll": row.last_polled_at.isoformat() if row and row.last_polled_at else None,
            "alerted_at": row.alerted_at.isoformat() if row and row.alerted_at else None,
        })
    for name, row in sorted(rows.items()):
        out.append({"name": name, "configured": False, "department": None, "server": None,
                    "folder": None, "uidvalidity": row.uidvalidity, "last_uid": row.last_uid,
                    "backlog": row.backlog, "last_error": row.last_error,
                    "last_poll": row.last_polled_at.isoformat() if row.last_polled_at else None,
                    "alerted_at": row.alerted_at.isoformat() if row.alerted_at else None})
    return out


async def cmd_imap_status(settings: Settings, args: argparse.Namespace) -> int:
    store = Store(settings.database_url)
    try:
        async with store.read() as session:
            rows = status_rows(settings, await imap_checkpoints.all_rows(session))
    finally:
        await store.dispose()
    if args.json:
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    if not rows:
        print("no [[imap]] mailboxes are configured")
        return 0
    for row in rows:
        state = "never polled" if row["last_poll"] is None else f"last poll {row['last_poll']}"
        where = f"{row['server']} {row['folder']}" if row["configured"] else "(not configured)"
        print(f"{row['name']}: {where}: last UID {row['last_uid'] or 0}, backlog "
              f"{row['backlog'] or 0}, {state}")
        if row["last_error"]:
            print(f"  last error: {row['last_error']}")
        if row["alerted_at"]:
            print(f"  operators alerted at {row['alerted_at']}")
    return 0


async def probe(cfg: ImapSettings, timeout_s: float = 30.0) -> dict[str, Any]:
    """Log in, EXAMINE the folder (read-only: nothing changes), report what the server said."""
    client = await imap_client.connect(cfg, timeout_s=timeout_s,
                                       secret=TokenSource(cfg).secret)
    try:
        info = await imap_client.select(client, cfg.folder, readonly=True)
        capabilities = sorted(client.protocol.capabilities)
        return {"name": cfg.name, "server": f"{cfg.host}:{cfg.port}", "tls": cfg.tls,
                "user": cfg.user, "auth": cfg.auth, "folder": cfg.folder,
                "capabilities": capabilities, "idle": "IDLE" in capabilities,
                "uidvalidity": info.uidvalidity, "messages": info.exists,
                "uidnext": info.uidnext}
    finally:
        await imap_client.logout(client)


def describe_probe(found: dict[str, Any]) -> list[str]:
    return [
        f"{found['name']}: logged in to {found['server']} as {found['user']} "
        f"(tls {found['tls']}, auth {found['auth']})",
        f"  capabilities: {' '.join(found['capabilities'])}",
        f"  IDLE: {'yes' if found['idle'] else 'no (polling every poll_interval_s)'}",
        f"  folder {found['folder']}: UIDVALIDITY {found['uidvalidity']}, "
        f"{found['messages'] if found['messages'] is not None else '?'} messages, "
        f"UIDNEXT {found['uidnext'] if found['uidnext'] is not None else '?'}",
    ]


async def cmd_imap_test(settings: Settings, args: argparse.Namespace) -> int:
    cfg = next((m for m in settings.imap if m.name == args.name), None)
    if cfg is None:
        known = ", ".join(m.name for m in settings.imap) or "none is configured"
        print(f"deskgate: imap test: no [[imap]] mailbox is named {args.name!r} ({known})",
              file=sys.stderr)
        return 1
    try:
        found = await probe(cfg)
    except Exception as exc:  # noqa: BLE001 — any failure is the answer, in one line
        print(f"deskgate: imap test {cfg.name}: {describe(exc)}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(found, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print("\n".join(describe_probe(found)))
    return 0


def add_parsers(sub: Any) -> None:
    imap = sub.add_parser("imap", help="IMAP mailboxes read by deskgate").add_subparsers(
        dest="action", required=True)
    status = imap.add_parser("status", help="per mailbox: last UID, backlog, last error, "
                             "last poll")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_imap_status)
    test = imap.add_parser("test", help="log in to one mailbox, open its folder read-only "
                           "and print what the server offers")
    test.add_argument("name", help="the name of an [[imap]] table")
    test.add_argument("--json", action="store_true")
    test.set_defaults(run=cmd_imap_test)
