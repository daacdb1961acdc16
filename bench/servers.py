"""Start the servers under test and read their CPU time and memory from /proc."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TICK = os.sysconf("SC_CLK_TCK")
PG_HOST, PG_USER = "127.0.0.1", "postgres"

CONFIG = """\
hostname = "bench.deskgate.test"
[database]
url = "{url}"
[inbound]
listen = "127.0.0.1:{port}"
max_message_bytes = {max_bytes}
# smtp-source sends every mail from one sender, and the probe sends a NOOP every 10 ms on
# one connection: the abuse limits (issue 11) would refuse the load itself, so they are
# off; everything else is the default.
max_commands = 1000000
max_mails_per_connection = 1000000
[inbound.rate_limits]
per_sender = 0
per_domain = 0
per_ip = 0
[web]
listen = "127.0.0.1:{web_port}"
[relay]
listen = "127.0.0.1:{relay_port}"
security = "none"
[tickets]
secret = "bench-secret-0123456789abcdef"
[[departments]]
name = "Support"
slug = "support"
addresses = ["support@example.test"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def migrated_gateway(url: str) -> Any:
    """An in-process Gateway as `deskgate serve` builds it (CONFIG), on a store migrated
    first; not started. Imports late: bench/ingest_cost.py points sys.path at another tree."""
    from gateway.service import Gateway
    from gateway.settings import parse_settings
    from store.engine import Store
    from store.migrate import upgrade

    store = Store(url)
    await upgrade(store)
    await store.dispose()
    text = CONFIG.format(url=url, port=0, max_bytes=2**20, relay_port=free_port(),
                         web_port=free_port())
    return Gateway(parse_settings(text, "bench.toml"))


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with {process.returncode}") from None
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening on {port}")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class Server:
    """One variant under test: a process (or a supervisor and its workers) on one port."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    database: str = ""  # URL, for counting what was stored
    pids: list[int] = field(default_factory=list)
    relay: subprocess.Popen[bytes] | None = None  # Postfix smtp-sink taking acknowledgements

    def discover(self, workers: int) -> None:
        self.pids = [self.process.pid]
        if workers > 1:
            for _ in range(100):
                children = _children(self.process.pid)
                if len(children) >= workers:
                    break
                time.sleep(0.05)
            self.pids += children
            # a worker process has started listening once the port answers twice as often...
            time.sleep(1.0)  # ...so give the second worker time to bind as well

    def cpu_s(self) -> float:
        """CPU of the serving processes and of their helpers (the small mails' parser, the big
        mails' parser pool): the work a mail costs, wherever it is done."""
        total = 0
        helpers = [child for pid in self.pids for child in _children(pid) if child not in self.pids]
        for pid in self.pids + helpers:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime
            if pid not in helpers:  # and of its children reaped meanwhile (a helper replaced)
                total += int(fields[13]) + int(fields[14])  # cutime, cstime
        return total / TICK

    def reset_peak(self) -> None:
        for pid in self.pids:
            try:  # "5" resets VmHWM to the current RSS (proc(5), Linux >= 4.0)
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_rss_mib(self) -> float:
        """Largest peak RSS of one serving process (the supervisor is not serving)."""
        serving = self.pids[1:] or self.pids
        return max(_status_kib(pid, "VmHWM") for pid in serving) / 1024

    def helpers_peak_rss_mib(self) -> float:
        """Largest peak RSS of a serving process's own children (the parser process of big
        mails): memory the mail costs outside the serving process itself."""
        helpers = [child for pid in self.pids for child in _children(pid)
                   if child not in self.pids]
        return max((_status_kib(pid, "VmHWM") for pid in helpers), default=0) / 1024

    def rss_mib(self) -> float:
        serving = self.pids[1:] or self.pids
        return max(_status_kib(pid, "VmRSS") for pid in serving) / 1024

    def stop(self) -> None:
        for process in (self.process, self.relay):
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start_sink(name: str, workdir: Path) -> Server:
    port = free_port()
    log = (workdir / f"{name}.log").open("wb")
    process = subprocess.Popen([PYTHON, str(ROOT / "bench" / "sink.py"), str(port)],
                               stdout=log, stderr=log)
    wait_listening(port, process, name)
    server = Server(name, port, process)
    server.discover(1)
    return server


def deskgate_config(name: str, workdir: Path, url: str, max_bytes: int,
                    relay_port: int, source: Path = ROOT) -> tuple[Path, int]:
    port = free_port()
    config = workdir / f"{name}.toml"
    config.write_text(CONFIG.format(url=url, port=port, max_bytes=max_bytes,
                                    relay_port=relay_port, web_port=free_port()))
    subprocess.run([PYTHON, "-m", "gateway.cli", "--config", str(config), "db", "upgrade"],
                   check=True, capture_output=True, cwd=source)
    return config, port


def start_deskgate(name: str, workdir: Path, url: str, workers: int = 1,
                   max_bytes: int = 64 * 2**20, source: Path = ROOT,
                   env: dict[str, str] | None = None) -> Server:
    """deskgate serving on a free port; `source`: a tree holding another version's code;
    `env`: added to its environment."""
    # Acknowledgements go to a Postfix smtp-sink (C, fast), as to a real smarthost.
    relay_port = free_port()
    as_user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink refuses to run as root
    relay = subprocess.Popen([shutil.which("smtp-sink") or "/usr/sbin/smtp-sink", *as_user,
                              f"127.0.0.1:{relay_port}", "256"])
    config, port = deskgate_config(name, workdir, url, max_bytes, relay_port, source)
    log = (workdir / f"{name}.log").open("wb")  # the service's log, as journald would keep it
    command = [PYTHON, "-m", "gateway.cli", "--config", str(config), "serve"]
    if workers > 1:
        command += ["--workers", str(workers)]
    process = subprocess.Popen(command, stdout=log, stderr=log, cwd=source,
                               env={**os.environ, **(env or {})})
    wait_listening(port, process, name)
    server = Server(name, port, process, url, relay=relay)
    server.discover(workers)
    return server


def sqlite_url(workdir: Path, name: str) -> str:
    return f"sqlite+aiosqlite:///{workdir / (name + '.sqlite3')}"


def psql(sql: str, database: str = "postgres") -> str:
    result = subprocess.run(["psql", "-h", PG_HOST, "-U", PG_USER, "-d", database, "-tAc", sql],
                            check=True, capture_output=True, text=True, timeout=60)
    return result.stdout.strip()


def pg_available() -> bool:
    if shutil.which("psql") is None:
        return False
    try:
        psql("SELECT 1")
        return True
    except (subprocess.SubprocessError, OSError):
        return False


def pg_create(prefix: str) -> tuple[str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    psql(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:5432/{name}"


def pg_drop(name: str) -> None:
    psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def scratch_database(backend: str, workdir: Path, name: str) -> Iterator[str]:
    """A fresh store's URL for one measurement: a SQLite file in workdir, or a PostgreSQL
    database dropped afterwards."""
    if backend != "postgres":
        yield sqlite_url(workdir, name)
        return
    database, url = pg_create(f"deskgate_{name}")
    try:
        yield url
    finally:
        pg_drop(database)


def stored_counts(url: str) -> tuple[int, int]:
    """(tickets, inbound messages) in a deskgate store."""
    sql_t, sql_m = "SELECT count(*) FROM tickets", "SELECT count(*) FROM messages"
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url.split("///", 1)[1]) as conn:
            return conn.execute(sql_t).fetchone()[0], conn.execute(sql_m).fetchone()[0]
    database = url.rsplit("/", 1)[1]
    return int(psql(sql_t, database)), int(psql(sql_m, database))
