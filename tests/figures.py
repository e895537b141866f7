"""Figures measured by the reliability and security suites, for docs/reliability.md.

Each test that measures something calls :func:`save` with a name and a JSON-able dict; the
files land in ``build/figures/`` (override with PLEURA_FIGURES_DIR) and are read when the
document is written. Nothing here decides whether a test passes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.support import ROOT

FIGURES_DIR = Path(os.environ.get("PLEURA_FIGURES_DIR", ROOT / "build" / "figures"))


def save(name: str, figures: dict) -> Path:
    """Write ``figures`` (plus the time of the run) to ``<FIGURES_DIR>/<name>.json``."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    path = FIGURES_DIR / f"{name}.json"
    # written aside and renamed: tests run in parallel (pytest-xdist), and a reader never sees half a file
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    part.write_text(json.dumps({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **figures},
                               indent=2, default=str))
    part.replace(path)
    return path
