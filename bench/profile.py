"""Profile deskgate's hot path: one SQLite (or PostgreSQL) server under smtp-source load,
sampled by py-spy; prints the top entries (bench/profile_top.py).

Usage: python bench/profile.py [SECONDS] [sqlite|postgres]   (py-spy is not a project
dependency: .venv/bin/pip install py-spy). PROFILE_KB=100 loads with 100 KB mails (default
5). The raw profile stays in var/bench/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_top import main as top  # noqa: E402
from run import smtp_source_for, warm  # noqa: E402
from servers import ROOT, pg_create, pg_drop, sqlite_url, start_deskgate  # noqa: E402

SIZE = int(os.environ.get("PROFILE_KB", "5")) * 1024  # the load's mail size


def main(seconds: float, store: str) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="deskgate-profile-", dir=ROOT / "var"))
    out = ROOT / "var" / "bench" / f"profile-{store}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    database = ""
    if store == "postgres":
        database, url = pg_create("deskgate_profile")
    else:
        url = sqlite_url(workdir, "profile")
    server = warm(start_deskgate(f"profile-{store}", workdir, url))
    try:
        load = threading.Thread(target=smtp_source_for,
                                args=(server.port, 20, SIZE, seconds + 1))
        load.start()
        subprocess.run([spy, "record", "-r", "250", "-f", "raw", "-d", str(int(seconds)),
                        "-o", str(out), "--pid", str(server.process.pid)],
                       check=True, capture_output=True)
        load.join()
    finally:
        server.stop()
        if database:
            pg_drop(database)
    print(f"raw profile: {out}")
    top(str(out), 30)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 10,
         sys.argv[2] if len(sys.argv) > 2 else "sqlite")
