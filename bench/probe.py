"""Our own SMTP client, for what smtp-source cannot do.

smtp-source sends the same text every time, so it measures throughput only. This client
measures the latency of the end of DATA (final dot -> reply) under that load, with a mix of
new tickets and replies (In-Reply-To/References to its own earlier mails), the event-loop
lag of the server (NOOP round trips) and small mails while big ones arrive. It prints one
JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import signal
import sys
import threading
import time
import uuid

CUSTOMERS = 50


class Connection:
    """One SMTP connection; commands answered in order, no pipelining."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        conn = cls(reader, writer)
        await conn.reply()
        await conn.command(b"EHLO probe.bench.test")
        return conn

    async def reply(self) -> int:
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return int(line[:3])

    async def command(self, line: bytes) -> int:
        self.writer.write(line + b"\r\n")
        return await self.reply()

    async def send(self, sender: str, rcpt: str, body: bytes) -> tuple[int, float]:
        """One transaction; returns the final reply code and the seconds from the final dot."""
        for line in (f"MAIL FROM:<{sender}>".encode(), f"RCPT TO:<{rcpt}>".encode()):
            code = await self.command(line)
            if code >= 400:
                await self.command(b"RSET")
                return code, 0.0
        if await self.command(b"DATA") != 354:
            return 554, 0.0
        self.writer.write(body)
        await self.writer.drain()
        started = time.perf_counter()
        code = await self.command(b".")
        return code, time.perf_counter() - started

    async def close(self) -> None:
        try:
            await self.command(b"QUIT")
        except (OSError, ConnectionError, ValueError):
            pass
        self.writer.close()


def mail(tag: str, i: int, size: int, in_reply_to: str | None = None) -> tuple[str, bytes]:
    """A CRLF mail of about `size` bytes; no line starts with a dot, so no dot-stuffing."""
    sender = f"c{i % CUSTOMERS}@customer.example"
    message_id = f"<{tag}.{i}@customer.example>"
    head = [f"From: Customer {i % CUSTOMERS} <{sender}>", "To: support@example.test",
            f"Message-ID: {message_id}", "Date: Mon, 23 Nov 2026 18:00:00 +0000",
            "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8"]
    if in_reply_to:
        head += [f"Subject: Re: Question {tag} {i}", f"In-Reply-To: {in_reply_to}",
                 f"References: {in_reply_to}"]
    else:
        head.append(f"Subject: Question {tag} {i}")
    line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor."
    body = [line] * max(1, size // (len(line) + 2))
    return message_id, ("\r\n".join([*head, "", *body]) + "\r\n").encode()


async def probe_mails(port: int, size: int, pause_s: float, stop: asyncio.Event,
                      limit: int = 0) -> dict[str, object]:
    """Sequential mails, every other one a reply to an earlier new one, until stopped."""
    tag = uuid.uuid4().hex[:12]
    latencies: list[float] = []
    codes: dict[int, int] = {}
    earlier: list[str] = []
    conn = await Connection.open(port)
    i = 0
    while not stop.is_set() and (not limit or i < limit):
        parent = earlier[(i // 2) % len(earlier)] if i % 2 and earlier else None
        message_id, body = mail(tag, i, size, parent)
        code, latency = await conn.send(f"c{i % CUSTOMERS}@customer.example",
                                        "support@example.test", body)
        codes[code] = codes.get(code, 0) + 1
        if code == 250:
            latencies.append(latency)
            if parent is None:
                earlier.append(message_id)
        i += 1
        await asyncio.sleep(pause_s)
    await conn.close()
    return {"latencies_s": latencies, "codes": codes, "tag": tag}


async def noop_lag(port: int, interval_s: float, stop: asyncio.Event) -> list[float]:
    """NOOP is answered by the protocol alone: its round trip is the server loop's lag."""
    conn = await Connection.open(port)
    lags: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        await conn.command(b"NOOP")
        lags.append(time.perf_counter() - started)
        await asyncio.sleep(interval_s)
    await conn.close()
    return lags


def big_body(tag: str, i: int, size: int) -> bytes:
    # A base64 attachment of random bytes: what a big mail carries is mostly compressed
    # already (PDF, JPEG, ZIP), so neither the store nor the disk can shrink it.
    head = (f"From: big{i}@customer.example\r\nTo: support@example.test\r\n"
            f"Subject: Big {tag} {i}\r\nMessage-ID: <big.{tag}.{i}@customer.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n"
            "--b\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n--b\r\n"
            "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            "Content-Disposition: attachment; filename=big.bin\r\n\r\n").encode()
    data = random.Random(f"{tag}.{i}").randbytes(size * 57 // 78)  # 57 bytes a 78-byte line
    encoded = base64.encodebytes(data)
    return head + encoded.replace(b"\n", b"\r\n") + b"--b--\r\n"


async def big_sender(port: int, i: int, body: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    conn = await Connection.open(port)
    code, _ = await conn.send(f"big{i}@customer.example", "support@example.test", body)
    await conn.close()
    return code, time.perf_counter() - started


def disk_syncs(path: str, interval_s: float, stop: threading.Event) -> list[float]:
    """A 4 KiB overwrite and fdatasync every interval, in a thread: what any small durable
    commit on the same disk waits for meanwhile, whoever the server is."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    block = bytearray(4096)
    syncs: list[float] = []
    try:
        while not stop.wait(interval_s):
            block[:8] = time.perf_counter_ns().to_bytes(8, "little")
            started = time.perf_counter()
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            syncs.append(time.perf_counter() - started)
    finally:
        os.close(fd)
    return syncs


async def own_lag(interval_s: float, stop: asyncio.Event) -> list[float]:
    """How late this client's own loop wakes up: when the machine's two cores are busy, the
    client measuring is delayed too, and that delay is not the server's."""
    lags: list[float] = []
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(interval_s)
        lags.append(time.perf_counter() - started - interval_s)
    return lags


async def phase(port: int, seconds: float, big: int, big_bytes: int,
                disk_file: str = "") -> dict[str, object]:
    stop = asyncio.Event()
    sender = None
    if big:  # another process, as another MTA: building and writing 10 MiB bodies here
        # would stall this loop and count the client's own delay as the server's. It builds
        # its bodies first (an MTA sends from its queue) and sends when told to.
        sender = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "send-big", "--port", str(port), "--big", str(big),
            "--big-bytes", str(big_bytes), "--tag", uuid.uuid4().hex[:8],
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert sender.stdout is not None and sender.stdin is not None
        if await sender.stdout.readline() != b"ready\n":
            raise RuntimeError("the big-mail sender did not get ready")
    small = asyncio.create_task(probe_mails(port, 5 * 1024, 0.02, stop))
    lag = asyncio.create_task(noop_lag(port, 0.01, stop))
    own = asyncio.create_task(own_lag(0.005, stop))
    disk_stop = threading.Event()  # from here on, the finally below stops its thread
    disk = asyncio.create_task(asyncio.to_thread(disk_syncs, disk_file, 0.005, disk_stop)) \
        if disk_file else None
    started = time.perf_counter()
    try:
        if sender is not None:
            output, _ = await sender.communicate(b"go\n")
            results = [tuple(r) for r in json.loads(output)]
        else:
            await asyncio.sleep(seconds)
            results = []
    finally:  # the disk thread would keep the process alive
        disk_stop.set()
    elapsed = time.perf_counter() - started
    stop.set()
    out = await small
    out["disk_sync_s"] = await disk if disk is not None else []
    out["lag_s"] = await lag
    out["own_lag_s"] = await own
    out["elapsed_s"] = elapsed
    out["big_codes"] = [code for code, _ in results]
    out["big_seconds"] = [seconds for _, seconds in results]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["latency", "big", "send-big"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, default=5 * 1024)
    parser.add_argument("--pause-ms", type=float, default=10)
    parser.add_argument("--big", type=int, default=20)
    parser.add_argument("--big-mb", type=float, default=10)
    parser.add_argument("--baseline-s", type=float, default=5)
    parser.add_argument("--big-bytes", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--disk-file", default="",
                        help="big: time a 4 KiB fdatasync of this file every 5 ms meanwhile")
    args = parser.parse_args()
    if args.mode == "send-big":  # the big mails of `phase`, at once, from this process
        bodies = [big_body(args.tag, i, args.big_bytes) for i in range(args.big)]
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        print(json.dumps(await asyncio.gather(*(big_sender(args.port, i, body)
                                               for i, body in enumerate(bodies)))))
        return
    if args.mode == "latency":
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        result = await probe_mails(args.port, args.size, args.pause_ms / 1000, stop)
    else:
        result = {"baseline": await phase(args.port, args.baseline_s, 0, 0, args.disk_file),
                  "with_big": await phase(args.port, 0, args.big, int(args.big_mb * 2**20),
                                          args.disk_file)}
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
