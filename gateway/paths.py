"""Where deskgate finds its templates: a source checkout, or an installed wheel's data."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def templates_dir() -> Path:
    """$DESKGATE_TEMPLATES, else the checkout's templates/, else <prefix>/share/deskgate."""
    override = os.environ.get("DESKGATE_TEMPLATES")
    candidates = [Path(override)] if override else []
    candidates += [Path(__file__).resolve().parents[1] / "templates",  # checkout, editable
                   Path(sys.prefix) / "share" / "deskgate" / "templates"]  # pip install .
    for candidate in candidates:
        if (candidate / "en").is_dir():
            return candidate
    raise FileNotFoundError(f"no templates in {', '.join(map(str, candidates))}")
