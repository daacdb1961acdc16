"""SQL statements and COMMITs per mail (each COMMIT is an fsync on SQLite, synchronous=FULL):
the same mails over real SMTP, with group commit and with one transaction per mail.

Usage: python bench/statements.py [MAILS] [SESSIONS] [sqlite|postgres]. Counts, not timings:
they do not depend on the machine's load.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import Connection, mail  # noqa: E402
from servers import ROOT, migrated_gateway, scratch_database  # noqa: E402
from sqlalchemy import event  # noqa: E402

from store import direct  # noqa: E402


async def measure(url: str, mails: int, sessions: int, max_batch: int) -> dict[str, float]:
    gateway = await migrated_gateway(url)
    await gateway.start(port=0)
    gateway.pipeline.commits.max_batch = max_batch
    counts = {"statements": 0, "commits": 0}

    def statement(*_: Any) -> None:
        counts["statements"] += 1

    def commit(*_: Any) -> None:
        counts["commits"] += 1

    event.listen(gateway.store.engine.sync_engine, "before_cursor_execute", statement)
    event.listen(gateway.store.engine.sync_engine, "commit", commit)
    direct_before = direct.executed  # statements past SQLAlchemy fire no event
    todo = list(range(mails))
    codes: dict[int, int] = {}

    async def client(tag: str) -> None:
        conn = await Connection.open(gateway.inbound_port)
        while todo:
            i = todo.pop()
            parent = f"<{tag}.{i - 1}@customer.example>" if i % 2 else None
            _, body = mail(tag, i, 5 * 1024, parent)
            code, _ = await conn.send(f"c{i % 50}@customer.example", "support@example.test",
                                      body)
            codes[code] = codes.get(code, 0) + 1
        await conn.close()

    try:
        await asyncio.gather(*(client(f"s{n}") for n in range(sessions)))
    finally:
        event.remove(gateway.store.engine.sync_engine, "before_cursor_execute", statement)
        event.remove(gateway.store.engine.sync_engine, "commit", commit)
        batches = gateway.pipeline.commits.batches
        counts["statements"] += direct.executed - direct_before
        await gateway.stop(drain_timeout_s=5)
    return {"statements_per_mail": counts["statements"] / mails,
            "commits_per_mail": counts["commits"] / mails, "batches": batches,
            "ok": codes.get(250, 0), "codes": codes}


async def main(mails: int, sessions: int, backend: str) -> None:
    with tempfile.TemporaryDirectory(dir=ROOT / "var") as workdir:
        for label, max_batch in (("group commit", 64), ("batches of one mail", 1)):
            with scratch_database(backend, Path(workdir), f"statements{max_batch}") as url:
                result = await measure(url, mails, sessions, max_batch)
            print(f"{backend} {label:<26} {mails} mails, {sessions} sessions: "
                  f"{result['statements_per_mail']:.1f} statements/mail, "
                  f"{result['commits_per_mail']:.3f} commits/mail "
                  f"({result['batches']} batches), replies {result['codes']}", flush=True)


if __name__ == "__main__":
    (ROOT / "var").mkdir(exist_ok=True)
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 400,
                     int(sys.argv[2]) if len(sys.argv) > 2 else 20,
                     sys.argv[3] if len(sys.argv) > 3 else "sqlite"))
