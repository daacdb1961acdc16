"""Time per corpus mail of parse() alone and of parse() + readable(): what issue 12 costs.

Run: .venv/bin/python bench/readable_cost.py [corpus dir] [rounds]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from gateway.ingest.parse import parse
from gateway.ingest.readable import readable, stored_attachments, warm_up


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _report(label: str, seconds: list[float]) -> None:
    ms = [s * 1000 for s in seconds]
    print(f"{label:<22} median {statistics.median(ms):7.3f} ms  p99 {_percentile(ms, 0.99):8.3f} ms"
          f"  max {max(ms):8.3f} ms  total {sum(ms):8.1f} ms")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/corpus")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    raws = [p.read_bytes() for p in sorted(root.rglob("*.eml"))]
    warm_up()  # load the language model once, as a running daemon has
    parse_s: list[float] = []
    step_s: list[float] = []
    small_s: list[float] = []
    for _ in range(rounds):
        for raw in raws:
            start = time.perf_counter()
            mail = parse(raw)
            parsed = time.perf_counter()
            readable(mail)
            stored_attachments(mail)
            done = time.perf_counter()
            parse_s.append(parsed - start)
            step_s.append(done - parsed)
            if len(raw) <= 5 * 1024:
                small_s.append(done - parsed)
    print(f"{len(raws)} mails x {rounds} rounds from {root}")
    _report("parse()", parse_s)
    _report("readable()", step_s)
    _report("readable() <= 5 KB", small_s)
    _report("parse() + readable()", [a + b for a, b in zip(parse_s, step_s, strict=True)])


if __name__ == "__main__":
    main()
