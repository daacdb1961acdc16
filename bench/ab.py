"""A/B of code versions: deskgate on SQLite from several source trees, loads interleaved.

Usage: python bench/ab.py NAME=DIR [NAME=DIR ...]   (DIR holds gateway/ and store/;
AB_ENV_NAME="KEY=VALUE KEY2=VALUE2" adds to that server's environment, e.g. to compare one
tree with and without a GLIBC_TUNABLES setting; AB_WORKERS=2 serves each with `--workers 2`;
AB_STORE=postgres gives each a scratch PostgreSQL database instead, dropped afterwards)
Each tree serves on its own port and database; smtp-source (20 sessions, 5 KB: AB_SESSIONS,
AB_KB) loads them in turn, A B C, C B A, ... Prints mails/s per round and CPU seconds per
1,000 mails.
AB_MODE=big runs the big-mail phase of `make bench` instead (5 mails of 10 MiB at once with
BENCH_QUICK=1, else 20 of 20 MiB; small mails alongside): small-mail p99 alone and with big
mails, per round and median. The servers keep their databases from round to round.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import BIG, BIG_MIB, big_mails, print_big, smtp_source_for, warm  # noqa: E402
from servers import ROOT, Server, pg_create, pg_drop, sqlite_url, start_deskgate  # noqa: E402

ROUNDS = int(os.environ.get("AB_ROUNDS", "4"))
RUN_S = float(os.environ.get("AB_RUN_S", "4"))
SESSIONS = int(os.environ.get("AB_SESSIONS", "20"))
SIZE = int(os.environ.get("AB_KB", "5")) * 1024
MODE = os.environ.get("AB_MODE", "throughput")
WORKERS = int(os.environ.get("AB_WORKERS", "1"))
STORE = os.environ.get("AB_STORE", "sqlite")


def main(pairs: list[str]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="deskgate-ab-", dir=ROOT / "var"))
    servers = []
    databases: list[str] = []
    try:
        for pair in pairs:
            name, _, source = pair.partition("=")
            env = dict(kv.split("=", 1) for kv in os.environ.get(f"AB_ENV_{name}", "").split())
            if STORE == "postgres":
                database, url = pg_create(f"deskgate_ab_{name}")
                databases.append(database)
            else:
                url = sqlite_url(workdir, name)
            servers.append(warm(start_deskgate(name, workdir, url, workers=WORKERS,
                                               source=Path(source), env=env)))
        if MODE == "big":
            big_rounds(servers)
            return
        rates: dict[str, list[float]] = {s.name: [] for s in servers}
        cpu: dict[str, list[float]] = {s.name: [] for s in servers}
        for rnd in range(ROUNDS):
            for server in servers if rnd % 2 == 0 else servers[::-1]:
                cpu0 = server.cpu_s()
                done, elapsed = smtp_source_for(server.port, SESSIONS, SIZE, RUN_S)
                rates[server.name].append(done / elapsed)
                cpu[server.name].append(1000 * (server.cpu_s() - cpu0) / max(1, done))
        base = statistics.median(rates[servers[0].name])
        for server in servers:
            rate = statistics.median(rates[server.name])
            print(f"{server.name:<24} {rate:7.1f} mails/s  x{rate / base:.2f}  rounds "
                  f"{' '.join(f'{r:.0f}' for r in rates[server.name])}  CPU "
                  f"{statistics.median(cpu[server.name]):.2f} s/1000 mails")
    finally:
        for server in servers:
            server.stop()
        for database in databases:
            pg_drop(database)


def big_rounds(servers: list[Server]) -> None:
    alone: dict[str, list[float]] = {s.name: [] for s in servers}
    with_big: dict[str, list[float]] = {s.name: [] for s in servers}
    disk: dict[str, list[float]] = {s.name: [] for s in servers}
    for rnd in range(ROUNDS):
        for server in servers if rnd % 2 == 0 else servers[::-1]:
            result = big_mails(server, BIG, BIG_MIB, 3)
            print_big(result)
            alone[server.name].append(result["baseline"]["small_p99_ms"])
            with_big[server.name].append(result["with_big"]["small_p99_ms"])
            disk[server.name].append(result["with_big"]["disk_sync_max_ms"])
    for server in servers:
        a, w = statistics.median(alone[server.name]), statistics.median(with_big[server.name])
        print(f"{server.name:<24} small-mail p99 alone {a:6.1f} ms, with {BIG} big {w:6.1f} ms "
              f"(x{w / a:.1f}); rounds with big "
              f"{' '.join(f'{v:.0f}' for v in with_big[server.name])}; the disk's longest "
              f"4 KiB fdatasync meanwhile {' '.join(f'{v:.0f}' for v in disk[server.name])} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
