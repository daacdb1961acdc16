"""A/B of code versions: deskgate on SQLite from several source trees, loads interleaved.

Usage: python bench/ab.py NAME=DIR [NAME=DIR ...]   (DIR holds gateway/ and store/)
Each tree serves on its own port and database; smtp-source (20 sessions, 5 KB) loads them
in turn, A B C, C B A, ... Prints mails/s per round and CPU seconds per 1,000 mails.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import smtp_source_for, warm  # noqa: E402
from servers import ROOT, sqlite_url, start_deskgate  # noqa: E402

ROUNDS = int(os.environ.get("AB_ROUNDS", "4"))
RUN_S = float(os.environ.get("AB_RUN_S", "4"))
SESSIONS = int(os.environ.get("AB_SESSIONS", "20"))


def main(pairs: list[str]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="deskgate-ab-", dir=ROOT / "var"))
    servers = []
    try:
        for pair in pairs:
            name, _, source = pair.partition("=")
            servers.append(warm(start_deskgate(name, workdir, sqlite_url(workdir, name),
                                               source=Path(source))))
        rates: dict[str, list[float]] = {s.name: [] for s in servers}
        cpu: dict[str, list[float]] = {s.name: [] for s in servers}
        for rnd in range(ROUNDS):
            for server in servers if rnd % 2 == 0 else servers[::-1]:
                cpu0 = server.cpu_s()
                done, elapsed = smtp_source_for(server.port, SESSIONS, 5 * 1024, RUN_S)
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



if __name__ == "__main__":
    main(sys.argv[1:])
