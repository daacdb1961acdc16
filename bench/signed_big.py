"""The event loop while a big DKIM-signed mail's signature is checked: in a thread (as every
mail was until this round) against the parser process, alternately, in one run; and while a
big outgoing mail is signed: on the loop (until this round) against the parser process.

dkimpy canonicalizes the whole body with regular expressions that hold the GIL, so a thread
stalls the loop; `make bench`'s big mails carry no signature (its customers' domains have no
DNS here), so this measures that step on its own, with a local key table.

Usage: python bench/signed_big.py [MiB] [rounds]
"""

from __future__ import annotations

import asyncio
import base64
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import dkim

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.ingest.authcheck import AuthChecker, AuthSettings, TableResolver  # noqa: E402
from gateway.ingest.model import Envelope  # noqa: E402
from gateway.ingest.offload import in_process  # noqa: E402
from gateway.ingest.parse import parse  # noqa: E402
from gateway.outbound.dkim import DkimKey, Signer, generate, sign_with  # noqa: E402


def signed_mail(mib: float) -> tuple[bytes, bytes]:
    """(mail, key record): a text part and a random attachment, signed relaxed/relaxed as
    Gmail and Microsoft 365 sign."""
    key = generate("rsa-sha256", 2048)
    data = random.Random(1).randbytes(int(mib * 2**20) * 57 // 78)
    raw = (b"From: Jess <jess@example.org>\r\nTo: support@example.test\r\nSubject: Scans\r\n"
           b"Message-ID: <big.1@example.org>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nThe scans,  as promised. \r\n--b\r\n"
           b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(data).replace(b"\n", b"\r\n") + b"--b--\r\n")
    signature = dkim.sign(raw, b"sel", b"example.org", key.private,
                          canonicalize=(b"relaxed", b"relaxed"))
    return signature + raw, key.dns_value.encode()


async def worst_lag(work: asyncio.Future[object] | asyncio.Task[object]) -> float:
    """The longest the loop went without running a 1 ms timer while `work` ran."""
    worst = 0.0
    while not work.done():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        worst = max(worst, time.perf_counter() - started - 0.001)
    await work
    return worst


async def main(mib: float, rounds: int) -> None:
    raw, record = signed_mail(mib)
    resolver = TableResolver({"sel._domainkey.example.org": [record],
                              "_dmarc.example.org": ["v=DMARC1; p=reject"]})
    checker = AuthChecker(AuthSettings(), "deskgate.bench", resolver)
    mail, envelope = parse(raw), Envelope("jess@example.org", ("support@example.test",),
                                          "192.0.2.1:25")
    await in_process(len, b"")  # the parser process started, as in a running daemon
    ways = {"thread (before)": lambda: asyncio.to_thread(checker.check_sync, raw, mail, envelope),
            "parser process (now)": lambda: checker.check(raw, mail, envelope)}
    await compare("inbound check", ways, rounds, mib)
    key = DkimKey("example.org", "sel", "rsa-sha256", generate("rsa-sha256", 2048).private)
    signer, outgoing = Signer([key]), raw[raw.index(b"From:"):]

    async def on_loop() -> bytes:
        return signer.sign(outgoing, "example.org")

    await compare("outbound signing", {
        "on the loop (before)": on_loop,
        "parser process (now)": lambda: in_process(partial(sign_with, key), outgoing)},
        rounds, mib)


async def compare(what: str, ways: dict[str, Any], rounds: int, mib: float) -> None:
    lags: dict[str, list[float]] = {name: [] for name in ways}
    took: dict[str, list[float]] = {name: [] for name in ways}
    headers = set()
    for index in range(rounds):
        for name, way in (ways.items() if index % 2 == 0 else reversed(ways.items())):
            started = time.perf_counter()
            task = asyncio.ensure_future(way())
            lags[name].append(await worst_lag(task))
            took[name].append(time.perf_counter() - started)
            result = task.result()
            # the verdict; for a signature, its body hash (t= moves with the clock)
            headers.add(getattr(result, "header", None)
                        or result[result.index(b"bh="):result.index(b";", result.index(b"bh="))])
    print(f"{what}: {mib:g} MiB mail, {rounds} rounds each, alternating")
    for name in ways:
        print(f"{name:<22} loop's longest stall median {1000 * statistics.median(lags[name]):6.1f}"
              f" ms (max {1000 * max(lags[name]):6.1f}); took median "
              f"{1000 * statistics.median(took[name]):6.1f} ms")
    print(f"same result both ways: {len(headers) == 1}")


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 10,
                     int(sys.argv[2]) if len(sys.argv) > 2 else 6))
