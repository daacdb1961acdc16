"""Event-loop CPU and SQL statements per mail of the ingest transaction, without SMTP.

Usage: python bench/ingest_cost.py [--mails N] [--tasks T] [--store sqlite|postgres|both]
                                   [--runs R] [--profile] [--against DIR]

One process builds the pipeline as `deskgate serve` does (gateway.service.Gateway: the
intercepts and after-store hooks of production; the relay worker, listeners and scheduler
are not started) on a fresh store, then T concurrent tasks feed N 5 KB mails through
`pipeline.ingest(raw, envelope)`, so group commit batches them as under SMTP load. Each task
alternates a new ticket and a reply (In-Reply-To/References) to its own previous mail.
Figures: CPU ms per mail of the main (event-loop) thread (time.thread_time), of the whole
process (time.process_time), wall ms per mail, SQL statements per mail (incl. SAVEPOINT,
RELEASE, BEGIN/COMMIT as the driver sees them). A warm-up of 40 mails is not counted.

--against DIR: the same measurement of the tree in DIR (holding gateway/ and store/) in
alternating subprocesses, R runs each; prints both medians side by side (with --source DIR,
that tree instead of this one).
--profile: cProfile of the main thread during the measured run; top entries by tottime
and cumtime.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WARMUP = 40
SIZE = 5 * 1024
CUSTOMERS = 50


def _prepare_path(source: str | None) -> None:
    """Import gateway/ and store/ from `source` (another version's tree) when given."""
    sys.path.insert(0, str(HERE))
    if source:
        sys.path.insert(0, str(Path(source).resolve()))


def _profiler() -> Any:
    """cProfile imports the stdlib's `profile`, which bench/profile.py would shadow."""
    bench = [p for p in sys.path if Path(p or ".").resolve() == HERE]
    sys.path[:] = [p for p in sys.path if p not in bench]
    sys.modules.pop("profile", None)
    try:
        import cProfile
    finally:
        sys.path[:0] = bench
    return cProfile.Profile(time.thread_time)  # CPU of this thread, not time spent waiting


def _mail(tag: str, i: int, parent: str | None) -> tuple[str, bytes]:
    from probe import mail  # bench/probe.py: the same 5 KB mails the SMTP bench sends

    return mail(tag, i, SIZE, parent)


async def _run(url: str, mails: int, tasks: int, profile: bool) -> dict[str, Any]:
    from servers import migrated_gateway
    from sqlalchemy import event

    from gateway import logs
    from gateway.ingest.model import Envelope
    from gateway.ingest.pipeline import Outcome

    try:
        from store import direct

        def past_sqlalchemy() -> int:
            return direct.executed
    except ImportError:  # --against a tree from before store/direct.py
        def past_sqlalchemy() -> int:
            return 0

    devnull = open(os.devnull, "w")  # noqa: SIM115 — the loggers keep it for the process
    with contextlib.redirect_stderr(devnull):
        logs.configure("info")  # as in production: every event rendered, then dropped
    gateway = await migrated_gateway(url)
    pipeline = gateway.pipeline
    await pipeline.start()  # departments, as Gateway.start does; nothing else is started
    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    outcomes: dict[str, int] = {}

    async def feed(tag: str, first: int, count_: int) -> None:
        parent = None
        for i in range(first, first + count_):
            message_id, raw = _mail(tag, i, parent if i % 2 else None)
            envelope = Envelope(f"c{i % CUSTOMERS}@customer.example",
                                ("support@example.test",), peer="127.0.0.1")
            verdict = await pipeline.ingest(raw, envelope)
            outcomes[verdict.outcome.value] = outcomes.get(verdict.outcome.value, 0) + 1
            parent = message_id

    per_task = [mails // tasks + (1 if n < mails % tasks else 0) for n in range(tasks)]
    try:
        await asyncio.gather(*(feed(f"w{n}", 0, WARMUP // tasks or 1) for n in range(tasks)))
        outcomes.clear()
        event.listen(store_engine := gateway.store.engine.sync_engine,
                     "before_cursor_execute", count)
        profiler = _profiler() if profile else None
        batches0 = pipeline.commits.batches
        direct0 = past_sqlalchemy()  # statements past SQLAlchemy fire no event
        wall0, thread0, process0 = time.perf_counter(), time.thread_time(), time.process_time()
        if profiler:
            profiler.enable()
        await asyncio.gather(*(feed(f"m{n}", 1000, per_task[n]) for n in range(tasks)))
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - wall0
        thread_s, process_s = time.thread_time() - thread0, time.process_time() - process0
        event.remove(store_engine, "before_cursor_execute", count)
        statements += past_sqlalchemy() - direct0
        batches = pipeline.commits.batches - batches0
    finally:
        await gateway.store.dispose()
    if outcomes.get(Outcome.STORED.value, 0) != mails:
        raise SystemExit(f"not every mail was stored: {outcomes}")
    result = {"loop_cpu_ms": 1000 * thread_s / mails, "process_cpu_ms": 1000 * process_s / mails,
              "wall_ms": 1000 * wall / mails, "statements": statements / mails,
              "mails_per_batch": mails / max(batches, 1)}
    if profiler:
        import pstats

        for key in ("tottime", "cumulative"):
            print(f"--- main thread, top 40 by {key} ---", flush=True)
            pstats.Stats(profiler, stream=sys.stdout).sort_stats(key).print_stats(40)
    return result


async def _one(backend: str, mails: int, tasks: int, profile: bool) -> dict[str, Any]:
    from servers import scratch_database

    (ROOT / "var").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "var") as workdir, \
            scratch_database(backend, Path(workdir), "ingest_cost") as url:
        return await _run(url, mails, tasks, profile)


def _line(label: str, r: dict[str, Any]) -> str:
    return (f"{label:<28} loop CPU {r['loop_cpu_ms']:6.3f} ms/mail  process CPU "
            f"{r['process_cpu_ms']:6.3f} ms/mail  wall {r['wall_ms']:6.3f} ms/mail  "
            f"{r['statements']:5.2f} statements/mail  {r['mails_per_batch']:5.1f} mails/batch")


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def _against(args: argparse.Namespace, backends: list[str]) -> None:
    """Alternating subprocesses, this tree and DIR, so the machine's drift hits both."""
    trees = {args.source or "this tree": args.source, args.against: args.against}
    for backend in backends:
        results: dict[str, list[dict[str, Any]]] = {label: [] for label in trees}
        for run in range(args.runs):
            order = list(trees.items()) if run % 2 == 0 else list(trees.items())[::-1]
            for label, source in order:
                command = [sys.executable, __file__, "--json", "--store", backend,
                           "--mails", str(args.mails), "--tasks", str(args.tasks)]
                if source:
                    command += ["--source", source]
                out = subprocess.run(command, check=True, capture_output=True, text=True,
                                     cwd=ROOT).stdout
                result = json.loads(out.strip().splitlines()[-1])
                results[label].append(result)
                print(_line(f"{backend} {label} #{run + 1}", result), flush=True)
        for label, runs in results.items():
            print(_line(f"{backend} MEDIAN {label}", _median(runs)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mails", type=int, default=600)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--store", default="sqlite", choices=("sqlite", "postgres", "both"))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--against", help="another tree (gateway/, store/) to compare with")
    parser.add_argument("--source", help="run the code of this tree (gateway/, store/)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _prepare_path(args.source)
    from servers import pg_available

    backends = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    if "postgres" in backends and not pg_available():
        print("PostgreSQL on 127.0.0.1:5432 is not reachable: skipped", flush=True)
        backends.remove("postgres")
    if args.against:
        _against(args, backends)
        return
    for backend in backends:
        results = [asyncio.run(_one(backend, args.mails, args.tasks, args.profile))
                   for _ in range(args.runs)]
        if args.json:
            print(json.dumps(_median(results)), flush=True)
            continue
        for n, result in enumerate(results):
            print(_line(f"{backend} #{n + 1}", result), flush=True)
        if len(results) > 1:
            print(_line(f"{backend} MEDIAN", _median(results)), flush=True)


if __name__ == "__main__":
    main()
