"""Outbound: DKIM-signed acknowledgements delivered to a local Postfix smtp-sink relay, mails/s
with rsa-2048 and with ed25519 keys (issue 10).

N mails are ingested with the relay worker off (their acknowledgements wait in the outbox);
then the worker (`RelayWorker.run_until_idle`: claim, render, sign, send over SMTP, settle)
empties the outbox into smtp-sink, timed. Usage: python bench/outbound.py [N]. Prints one
line per algorithm and, with --json, a JSON list.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import mail  # noqa: E402
from servers import CONFIG, ROOT, free_port, wait_listening  # noqa: E402
from sqlalchemy import func, select, update  # noqa: E402

from gateway.ingest.model import Envelope  # noqa: E402
from gateway.outbound import dkim  # noqa: E402
from gateway.service import Gateway  # noqa: E402
from gateway.settings import parse_settings  # noqa: E402
from store.engine import Store  # noqa: E402
from store.migrate import upgrade  # noqa: E402
from store.models import Address, Outbox  # noqa: E402

EXTRA = """
[outbox]
worker = false
[acknowledgements]
per_contact_per_hour = 1000000
[[dkim.keys]]
domain = "example.test"
selector = "bench"
algorithm = "{algorithm}"
key_file = "{key_file}"
"""


async def one(algorithm: str, count: int, workdir: Path) -> dict[str, Any]:
    key_file = workdir / f"{algorithm}.key"
    dkim.write_key(key_file, dkim.generate(algorithm))
    url = f"sqlite+aiosqlite:///{workdir / (algorithm + '.sqlite3')}"
    store = Store(url)
    await upgrade(store)
    await store.dispose()
    relay_port = free_port()
    as_user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses root
    sink = subprocess.Popen([shutil.which("smtp-sink") or "/usr/sbin/smtp-sink", *as_user,
                             f"127.0.0.1:{relay_port}", "256"])
    wait_listening(relay_port, sink, "smtp-sink")
    text = CONFIG.format(url=url, port=0, max_bytes=2**20, relay_port=relay_port,
                         web_port=free_port()) + EXTRA.format(algorithm=algorithm,
                                                              key_file=key_file)
    gateway = Gateway(parse_settings(text, "bench-outbound.toml"))
    await gateway.start(port=0)
    try:
        async with gateway.store.transaction() as session:  # as `deskgate address verify`
            await session.execute(update(Address).values(verification_state="verified"))
        tag = f"out{algorithm[:3]}"
        for i in range(count):
            _, raw = mail(tag, i, 2 * 1024)
            await gateway.pipeline.ingest(raw, Envelope(f"c{i % 50}@customer.example",
                                                        ("support@example.test",),
                                                        "127.0.0.1:1", "smtp"))
        worker = gateway.outbound.worker
        assert worker is not None
        cpu0, started = time.process_time(), time.perf_counter()
        attempted = await worker.run_until_idle()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
        async with gateway.store.read() as session:
            states = dict((await session.execute(
                select(Outbox.state, func.count()).group_by(Outbox.state))).all())
    finally:
        await gateway.stop(drain_timeout_s=5)
        sink.terminate()
        sink.wait()
    sent = states.get("sent", 0)
    return {"algorithm": algorithm, "acks": attempted, "states": states,
            "mails_s": sent / elapsed, "cpu_ms_per_mail": 1000 * cpu / max(1, sent)}


async def main(count: int, as_json: bool) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(dir=ROOT / "var") as workdir:
        for algorithm in ("rsa-sha256", "ed25519-sha256"):
            result = await one(algorithm, count, Path(workdir))
            results.append(result)
            if not as_json:
                print(f"outbound {algorithm:<15} {result['mails_s']:7.1f} acks/s signed and "
                      f"relayed, {result['cpu_ms_per_mail']:.2f} CPU ms each, outbox "
                      f"{result['states']}", flush=True)
    if as_json:
        print(json.dumps(results))
    return results


if __name__ == "__main__":
    (ROOT / "var").mkdir(exist_ok=True)
    args = [a for a in sys.argv[1:] if a != "--json"]
    asyncio.run(main(int(args[0]) if args else 300, "--json" in sys.argv))
