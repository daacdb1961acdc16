"""Coverage-guided fuzzing of the MIME parser and the pure pipeline behind it (atheris).

    make fuzz                      # FUZZ_SECONDS=120 by default
    .venv/bin/python tests/fuzz/fuzz_parse.py var/fuzz/corpus -max_total_time=60

Seeds: /work/shared/corpus (or FUZZ_SEED_DIR), copied once into var/fuzz/corpus, which
libFuzzer then grows. A Python exception or a broken promise (tests/fuzz/targets.py) is saved as
tests/data/fuzz/atheris-<sha1>.eml, one file per distinct failure, and fuzzing goes on;
tests/unit/test_fuzz.py replays that folder. Timeouts and out-of-memory inputs are written
by libFuzzer to var/fuzz/artifacts/ (the Makefile copies them next to the others).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import traceback
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["gateway", "email"]):
    from tests.fuzz.targets import pipeline, swallowed

REGRESSIONS = ROOT / "tests" / "data" / "fuzz"
WORK = ROOT / "var" / "fuzz"
SEEDS = Path(os.environ.get("FUZZ_SEED_DIR", "/work/shared/corpus"))
MAX_SEED = 64 * 1024  # larger seeds only slow every mutation down; they are tested elsewhere

_seen: set[str] = set()
_swallowed: dict[str, int] = {}
_runs = 0


def _signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames)
                  if "/gateway/" in f.filename or "/fuzz/" in f.filename), "?")
    return f"{type(exc).__name__}@{where}"


def _save(data: bytes, signature: str, exc: BaseException) -> None:
    name = REGRESSIONS / f"atheris-{hashlib.sha1(data).hexdigest()[:16]}.eml"
    name.write_bytes(data)
    print(f"\n=== FINDING {signature} -> {name.relative_to(ROOT)}", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)


def test_one_input(data: bytes) -> None:
    global _runs
    _runs += 1
    try:
        mail = pipeline(data, view=os.environ.get("FUZZ_VIEW", "1") == "1")
    except Exception as exc:  # noqa: BLE001 — every failure is a finding, keep fuzzing
        signature = _signature(exc)
        if signature not in _seen:
            _seen.add(signature)
            _save(data, signature, exc)
            _report()
        return
    for defect in swallowed(mail):
        first = defect not in _swallowed
        _swallowed[defect] = _swallowed.get(defect, 0) + 1
        if first:
            sample = WORK / "swallowed" / f"{defect.replace(':', '-')}.eml"
            sample.parent.mkdir(parents=True, exist_ok=True)
            sample.write_bytes(data)
            _report()
    if _runs % 5000 == 0:
        _report()


def _seed(corpus: Path) -> None:
    if any(corpus.iterdir()) or not SEEDS.is_dir():
        return
    for path in sorted(SEEDS.rglob("*.eml")):
        if path.stat().st_size <= MAX_SEED:
            shutil.copy(path, corpus / path.name)
    for path in sorted(REGRESSIONS.glob("*.eml")):
        shutil.copy(path, corpus / f"regression-{path.name}")


def _report() -> None:
    """libFuzzer leaves through _exit(): the summary is kept current in a file instead."""
    (WORK / "summary.txt").write_text(
        f"{_runs} inputs, {len(_seen)} distinct findings {sorted(_seen)}; "
        f"exceptions caught inside parse() (samples in var/fuzz/swallowed/): "
        f"{_swallowed or 'none'}\n")


def main() -> None:
    args = sys.argv[1:]
    if not any(not a.startswith("-") for a in args):
        corpus = WORK / "corpus"
        corpus.mkdir(parents=True, exist_ok=True)
        args.append(str(corpus))
    for arg in args:
        if not arg.startswith("-"):
            _seed(Path(arg))
    (WORK / "artifacts").mkdir(parents=True, exist_ok=True)
    defaults = [f"-artifact_prefix={WORK / 'artifacts'}/", "-timeout=20", "-rss_limit_mb=3072",
                "-max_len=262144"]
    options = [d for d in defaults if not any(a.startswith(d.split("=")[0] + "=") for a in args)]
    _report()
    atheris.Setup([sys.argv[0], *options, *args], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
