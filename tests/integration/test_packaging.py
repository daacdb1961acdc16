"""`pip install .` works for an operator: the wheel builds and carries what the daemon reads."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT


def test_wheel_ships_migrations_templates_and_the_command(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                             "-w", str(tmp_path), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = tmp_path.glob("deskgate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "store/migrations/env.py" in names
    assert any(n.startswith("store/migrations/versions/0001_") for n in names)
    data = next(n.split("/data/")[0] for n in names if "/data/share/deskgate/" in n)
    source_templates = {f"{data}/data/share/deskgate/{p.relative_to(ROOT)}" for p in
                        (ROOT / "templates").glob("**/*.j2")}
    assert len(source_templates) > 60 and source_templates <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "deskgate = gateway.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_version_is_the_installed_distribution() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway.cli", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip().startswith("deskgate ") and "unknown" not in result.stdout
