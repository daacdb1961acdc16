"""`deskgate imap status`: per configured mailbox, how far the import got (issue 7)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.settings import Settings
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
        })
    for name, row in sorted(rows.items()):
        out.append({"name": name, "configured": False, "department": None, "server": None,
                    "folder": None, "uidvalidity": row.uidvalidity, "last_uid": row.last_uid,
                    "backlog": row.backlog, "last_error": row.last_error,
                    "last_poll": row.last_polled_at.isoformat() if row.last_polled_at else None})
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
    return 0


def add_parsers(sub: Any) -> None:
    imap = sub.add_parser("imap", help="IMAP mailboxes read by deskgate").add_subparsers(
        dest="action", required=True)
    status = imap.add_parser("status", help="per mailbox: last UID, backlog, last error, "
                             "last poll")
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=cmd_imap_status)
