"""`make bench`: deskgate against the bare aiosmtpd sink, side by side, in one run.

Variants run interleaved (A B C D E, then E D C B A, ...) so drift in the machine's load
falls on all of them alike. Throughput comes from Postfix's smtp-source; latency (final dot
-> reply) from bench/probe.py, a second process sending new tickets and replies alongside.
Everything printed is measured in this run. BENCH_QUICK=1 runs a smaller matrix.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import (  # noqa: E402
    PYTHON,
    ROOT,
    Server,
    pg_available,
    pg_create,
    pg_drop,
    sqlite_url,
    start_deskgate,
    start_sink,
    stored_counts,
)

QUICK = os.environ.get("BENCH_QUICK") == "1"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
KB = 1024
# Every load run lasts the same time, whatever the variant's speed: mails/s = mails done / time.
if QUICK:
    MATRIX = [(20, 5 * KB)]
    RUN_S, ROUNDS, BIG, MEMORY_CHUNKS, MEMORY_CHUNK = 2.5, 2, 5, 4, 200
else:
    MATRIX = [(s, size) for size in (5 * KB, 100 * KB) for s in (1, 20, 100)]
    RUN_S, ROUNDS, BIG, MEMORY_CHUNKS, MEMORY_CHUNK = 2.5, 2, 20, 10, 2000
# The bound on small mails is "while 20 MB mails arrive alongside".
BIG_MIB = float(os.environ.get("BENCH_BIG_MIB") or (10 if QUICK else 20))
# The memory bound is from mail 10,000 to 100,000: BENCH_MEMORY_MAILS=100000 (under
# 3 minutes on this machine in its last run); RSS is read after every tenth of them.
if os.environ.get("BENCH_MEMORY_MAILS"):
    MEMORY_CHUNK = max(1, int(os.environ["BENCH_MEMORY_MAILS"]) // 10)
    MEMORY_CHUNKS = 10


def cpu_busy() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _source_command(port: int, sessions: int, count: int, size: int) -> list[str]:
    # One connection per mail (no -d), as an MTA delivering a queue would mostly do. Each
    # mail gets its own Message-Id from smtp-source, so each one makes a new ticket.
    return [SMTP_SOURCE, "-s", str(sessions), "-m", str(count), "-l", str(size),
            "-f", "customer@example.org", "-t", "support@example.test",
            "-M", "source.bench.test", "-S", "Bench mail", f"127.0.0.1:{port}"]


def smtp_source(port: int, sessions: int, count: int, size: int) -> float:
    started = time.perf_counter()
    result = subprocess.run(_source_command(port, sessions, count, size), capture_output=True,
                            text=True)
    elapsed = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"smtp-source failed: {result.stderr.strip()[-300:]}")
    return elapsed


def smtp_source_for(port: int, sessions: int, size: int, seconds: float) -> tuple[int, float]:
    """Load for a fixed time; -c makes smtp-source print a counter after each accepted DATA."""
    command = _source_command(port, sessions, 10**7, size)
    command.insert(1, "-c")
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(seconds)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate()
    elapsed = time.perf_counter() - started
    if process.returncode != -signal.SIGTERM:
        raise RuntimeError(f"smtp-source stopped early: {err.decode().strip()[-300:]}")
    counters = out.replace(b"\n", b"\r").split(b"\r")
    done = next((int(c) for c in reversed(counters) if c.strip().isdigit()), 0)
    return done, elapsed


def warm(server: Server) -> Server:
    """First mails load lazily imported code and models: keep that out of the figures."""
    smtp_source(server.port, 2, 20, 5 * KB)
    return server


def one_run(server: Server, sessions: int, size: int) -> dict[str, Any]:
    probe = subprocess.Popen([PYTHON, str(ROOT / "bench" / "probe.py"), "latency",
                              "--port", str(server.port), "--size", str(size)],
                             stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    server.reset_peak()
    cpu0, busy0 = server.cpu_s(), cpu_busy()
    count, elapsed = smtp_source_for(server.port, sessions, size, RUN_S)
    cpu, busy1 = server.cpu_s() - cpu0, cpu_busy()
    probe.send_signal(signal.SIGTERM)
    out, _ = probe.communicate(timeout=120)
    latency = json.loads(out)
    handled = count + len(latency["latencies_s"])
    # How busy the whole machine was (all CPUs, the load tool and PostgreSQL included): a
    # variant near 100 % has no core left for a second worker process to use.
    machine = 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    return {"mails_s": count / elapsed, "cpu_s_per_1000": 1000 * cpu / handled,
            "machine_busy_pct": machine,
            "peak_rss_mib": server.peak_rss_mib(), "latencies_s": latency["latencies_s"],
            "probe_codes": latency["codes"]}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def matrix(servers: list[Server]) -> list[dict[str, Any]]:
    rows = []
    for sessions, size in MATRIX:
        runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
        for rnd in range(ROUNDS):
            order = servers if rnd % 2 == 0 else servers[::-1]
            for server in order:
                runs[server.name].append(one_run(server, sessions, size))
        base = statistics.median(r["mails_s"] for r in runs[servers[0].name])
        for server in servers:
            rs = runs[server.name]
            lat = [x for r in rs for x in r["latencies_s"]]
            rate = statistics.median(r["mails_s"] for r in rs)
            row = {"variant": server.name, "sessions": sessions, "size_kb": size // KB,
                   "mails_s": rate, "mails_s_rounds": [r["mails_s"] for r in rs],
                   "ratio": rate / base,
                   "p50_ms": 1000 * pct(lat, 0.5), "p99_ms": 1000 * pct(lat, 0.99),
                   "latency_samples": len(lat),
                   "cpu_s_per_1000": statistics.median(r["cpu_s_per_1000"] for r in rs),
                   "machine_busy_pct": statistics.median(r["machine_busy_pct"] for r in rs),
                   "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                   "probe_codes": [r["probe_codes"] for r in rs]}
            rows.append(row)
            print_row(row)
    return rows


HEADER = (f"{'variant':<18}{'sess':>5}{'size':>6}{'mails/s':>9}{'rounds':>14}{'ratio':>7}"
          f"{'p50 ms':>8}{'p99 ms':>8}{'n':>5}{'cpu s/1k':>9}{'RSS MiB':>9}{'box %':>7}")


def print_row(row: dict[str, Any]) -> None:
    rounds = "/".join(f"{x:.0f}" for x in row["mails_s_rounds"])
    print(f"{row['variant']:<18}{row['sessions']:>5}{row['size_kb']:>5}K{row['mails_s']:>9.0f}"
          f"{rounds:>14}{row['ratio']:>7.2f}{row['p50_ms']:>8.1f}{row['p99_ms']:>8.1f}"
          f"{row['latency_samples']:>5}{row['cpu_s_per_1000']:>9.2f}{row['peak_rss_mib']:>9.1f}"
          f"{row['machine_busy_pct']:>7.0f}",
          flush=True)


def big_mails(server: Server, count: int, mib: float, baseline_s: float) -> dict[str, Any]:
    server.reset_peak()
    rss0 = server.rss_mib()
    (ROOT / "var" / "bench").mkdir(parents=True, exist_ok=True)  # the disk probe's file
    out = subprocess.run([PYTHON, str(ROOT / "bench" / "probe.py"), "big", "--port",
                          str(server.port), "--big", str(count), "--big-mb", str(mib),
                          "--baseline-s", str(baseline_s),
                          # on the disk the stores write to: var/ holds the SQLite files
                          "--disk-file", str(ROOT / "var" / "bench" / "disk-probe.dat")],
                         capture_output=True, text=True, check=True, timeout=600).stdout
    data = json.loads(out)
    result: dict[str, Any] = {"variant": server.name, "big": count, "big_mib": mib,
                              "rss_before_mib": rss0, "peak_rss_mib": server.peak_rss_mib(),
                              "helper_peak_rss_mib": server.helpers_peak_rss_mib()}
    for key in ("baseline", "with_big"):
        phase = data[key]
        lat, lag, own = phase["latencies_s"], phase["lag_s"], phase["own_lag_s"]
        result[key] = {"small_p50_ms": 1000 * pct(lat, 0.5), "small_p99_ms": 1000 * pct(lat, 0.99),
                       "small_max_ms": 1000 * max(lat, default=float("nan")), "small_n": len(lat),
                       "lag_p50_ms": 1000 * pct(lag, 0.5), "lag_p99_ms": 1000 * pct(lag, 0.99),
                       "lag_max_ms": 1000 * max(lag, default=float("nan")),
                       "client_lag_p99_ms": 1000 * pct(own, 0.99),
                       "disk_sync_p99_ms": 1000 * pct(phase["disk_sync_s"], 0.99),
                       "disk_sync_max_ms": 1000 * max(phase["disk_sync_s"], default=float("nan")),
                       "elapsed_s": phase["elapsed_s"], "big_codes": phase["big_codes"]}
    return result


def print_big(r: dict[str, Any]) -> None:
    b, w = r["baseline"], r["with_big"]
    print(f"{r['variant']:<14} {r['big']} x {r['big_mib']:.0f} MiB in {w['elapsed_s']:.1f} s "
          f"(codes {sorted(set(w['big_codes']))}); small mail p50/p99/max "
          f"{b['small_p50_ms']:.1f}/{b['small_p99_ms']:.1f}/{b['small_max_ms']:.0f} ms alone, "
          f"{w['small_p50_ms']:.1f}/{w['small_p99_ms']:.1f}/{w['small_max_ms']:.0f} ms with big "
          f"(n={w['small_n']}); loop lag (NOOP) p50/p99/max {b['lag_p50_ms']:.1f}/"
          f"{b['lag_p99_ms']:.1f}/{b['lag_max_ms']:.0f} -> {w['lag_p50_ms']:.1f}/"
          f"{w['lag_p99_ms']:.1f}/{w['lag_max_ms']:.0f} ms; the client's own lag p99 "
          f"{b['client_lag_p99_ms']:.1f} -> {w['client_lag_p99_ms']:.1f} ms; a 4 KiB "
          f"fdatasync on the same disk p99/max {b['disk_sync_p99_ms']:.1f}/"
          f"{b['disk_sync_max_ms']:.0f} -> {w['disk_sync_p99_ms']:.1f}/"
          f"{w['disk_sync_max_ms']:.0f} ms; "
          f"RSS {r['rss_before_mib']:.1f} -> "
          f"peak {r['peak_rss_mib']:.1f} MiB (parser process {r['helper_peak_rss_mib']:.0f})",
          flush=True)


def memory(server: Server) -> dict[str, Any]:
    points = [(0, server.rss_mib())]
    for chunk in range(1, MEMORY_CHUNKS + 1):
        smtp_source(server.port, 20, MEMORY_CHUNK, 5 * KB)
        points.append((chunk * MEMORY_CHUNK, server.rss_mib()))
    half, first = points[len(points) // 2], points[1]  # the issue: from mail 10,000 of 100,000
    growth = 100 * (points[-1][1] - half[1]) / half[1]
    growth_first = 100 * (points[-1][1] - first[1]) / first[1]
    print(f"{server.name}: RSS over {points[-1][0]} mails (5 KB, 20 sessions): "
          + ", ".join(f"{n}: {rss:.1f}" for n, rss in points)
          + f" MiB; from mail {first[0]} to {points[-1][0]}: {growth_first:+.1f}%, from mail "
          f"{half[0]}: {growth:+.1f}%", flush=True)
    return {"variant": server.name, "points": points, "growth_second_half_pct": growth,
            "growth_after_first_tenth_pct": growth_first}


def throughput_phase(workdir: Path, results: dict[str, Any], databases: list[str],
                     servers: list[Server]) -> bool:
    """The interleaved matrix: the sink and the deskgate variants, all up at once; whether
    PostgreSQL was there."""
    servers.append(start_sink("aiosmtpd-sink", workdir))
    servers.append(start_deskgate("sqlite", workdir, sqlite_url(workdir, "sqlite")))
    have_pg = pg_available()
    if have_pg:
        name, url = pg_create("deskgate_bench")
        databases.append(name)
        servers.append(start_deskgate("postgres", workdir, url))
    servers.append(start_deskgate("sqlite-2workers", workdir,
                                  sqlite_url(workdir, "sqlite2"), workers=2))
    if have_pg:
        name, url = pg_create("deskgate_bench2")
        databases.append(name)
        servers.append(start_deskgate("postgres-2workers", workdir, url, workers=2))
    else:
        print("PostgreSQL on 127.0.0.1:5432 not reachable: its variants are left out")
    for server in servers:
        warm(server)
    print("\n" + HEADER, flush=True)
    results["matrix"] = matrix(servers)
    results["stored"] = {}
    for server in servers[1:]:
        tickets, messages = stored_counts(server.database)
        results["stored"][server.name] = {"tickets": tickets, "messages": messages}
    print("stored (tickets/messages; replies are messages - tickets): " + ", ".join(
        f"{k} {v['tickets']}/{v['messages']}" for k, v in results["stored"].items()))
    for server in servers:
        server.stop()
    servers.clear()
    return have_pg


def memory_only(workdir: Path, results: dict[str, Any], servers: list[Server]) -> None:
    """`BENCH_ONLY=memory`: the memory run alone (with BENCH_MEMORY_MAILS=100000: the
    issue's 100,000 mails), figures to var/bench/memory-STAMP.json."""
    server = warm(start_deskgate("sqlite-memory", workdir, sqlite_url(workdir, "memory")))
    servers.append(server)
    results["memory"] = memory(server)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = ROOT / "var" / "bench" / f"memory-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"figures written to {out}")


def big_phase(workdir: Path, have_pg: bool, databases: list[str],
              servers: list[Server]) -> list[dict[str, Any]]:
    """Big mails beside small ones (loop lag, small-mail latency), then one 50 MiB mail."""
    print(f"\nBig mails: {BIG} x {BIG_MIB:g} MiB sent at once, small 5 KB mails and NOOPs "
          "alongside", flush=True)
    big: list[dict[str, Any]] = []
    makers = [lambda: start_sink("aiosmtpd-sink", workdir),
              lambda: start_deskgate("sqlite-big", workdir, sqlite_url(workdir, "big"))]
    if have_pg:  # no single-writer lock there: tells the store's share from the loop's
        name, big_url = pg_create("deskgate_bench_big")
        databases.append(name)
        makers.append(lambda: start_deskgate("postgres-big", workdir, big_url))
    for make in makers:
        server = warm(make())
        servers.append(server)
        big.append(big_mails(server, BIG, BIG_MIB, 3 if QUICK else 5))
        print_big(big[-1])
        server.stop()
        servers.clear()
    for make in makers[1:2] if QUICK else makers:  # fresh: the growth is the mail's alone
        server = warm(make())
        servers.append(server)
        one = big_mails(server, 1, 50, 1)
        big.append(one)
        print(f"{server.name:<14} one 50 MiB mail: RSS {one['rss_before_mib']:.1f} -> peak "
              f"{one['peak_rss_mib']:.1f} MiB (growth "
              f"{one['peak_rss_mib'] - one['rss_before_mib']:.0f} MiB; parser process peak "
              f"{one['helper_peak_rss_mib']:.0f} MiB)", flush=True)
        server.stop()
        servers.clear()
    return big


def outbound() -> list[dict[str, Any]]:
    """DKIM-signed acknowledgements to a local smtp-sink: bench/outbound.py, its own process."""
    count = "200" if QUICK else "1000"
    out = subprocess.run([PYTHON, str(ROOT / "bench" / "outbound.py"), count, "--json"],
                         capture_output=True, text=True, check=True, timeout=1800, cwd=ROOT)
    results: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    for r in results:
        print(f"{r['algorithm']:<15} {r['mails_s']:7.1f} acks/s signed and relayed "
              f"({r['acks']} acks), {r['cpu_ms_per_mail']:.2f} CPU ms each", flush=True)
    return results


def check_tools() -> None:
    if not os.access(SMTP_SOURCE, os.X_OK):
        sys.exit("bench: smtp-source not found; install the tool only: DEBIAN_FRONTEND="
                 "noninteractive apt-get install -y postfix, then `postfix stop` if it started")


def main() -> None:
    check_tools()
    workdir = Path(tempfile.mkdtemp(prefix="deskgate-bench-", dir=ROOT / "var"
                                    if (ROOT / "var").is_dir() else None))
    load0, busy0, started = os.getloadavg(), cpu_busy(), time.time()
    print(f"deskgate bench ({'quick' if QUICK else 'full'}), {os.cpu_count()} CPUs, load "
          f"{load0[0]:.2f}, work dir {workdir}", flush=True)
    databases: list[str] = []
    servers: list[Server] = []
    results: dict[str, Any] = {"quick": QUICK, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                         time.gmtime())}
    try:
        if os.environ.get("BENCH_ONLY") == "memory":  # the long memory run on its own
            return memory_only(workdir, results, servers)
        if os.environ.get("BENCH_ONLY") == "big":  # big mails beside small ones, on its own
            results["big"] = big_phase(workdir, pg_available(), databases, servers)
            return None
        have_pg = throughput_phase(workdir, results, databases, servers)
        results["big"] = big_phase(workdir, have_pg, databases, servers)

        print("\nMemory", flush=True)
        server = warm(start_deskgate("sqlite-memory", workdir, sqlite_url(workdir, "memory")))
        servers.append(server)
        results["memory"] = memory(server)
        server.stop()
        servers.clear()

        print("\nOutbound: acknowledgements, DKIM-signed, to a local smtp-sink relay", flush=True)
        results["outbound"] = outbound()
    finally:
        for server in servers:
            server.stop()
        for name in databases:
            try:
                pg_drop(name)
            except (subprocess.SubprocessError, OSError) as exc:
                print(f"could not drop database {name}: {exc}")
    busy1 = cpu_busy()
    load1 = os.getloadavg()
    results["machine"] = {"cpus": os.cpu_count(), "load_start": load0, "load_end": load1,
                          "cpu_busy_pct": 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
                          "seconds": time.time() - started}
    machine = results["machine"]
    print(f"\n{machine['seconds']:.0f} s; all CPUs {machine['cpu_busy_pct']:.0f}% "
          f"busy on average; load {load0[0]:.2f} -> {load1[0]:.2f}")
    out = ROOT / "var" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for path in (out / f"results-{stamp}.json", out / "last.json"):
        path.write_text(json.dumps(results, indent=1))
    print(f"figures written to {out / 'last.json'}")
    if os.environ.get("BENCH_KEEP") != "1":  # the servers' logs stay, for a 451 to be explained
        for database in workdir.glob("*.sqlite3*"):
            database.unlink()
    print(f"server logs kept in {workdir}")


if __name__ == "__main__":
    main()
