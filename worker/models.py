"""``pleura models``: list, verify, build and import model bundles.

Bundles are found by name among the built-in ones (``engines/bundles``) and the operator's
installed ones (``PLEURA_MODELS_DIR``, default ``<data dir>/models``), or given as a path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines import Bundle, load, load_bundle
from engines.bundle import BUILTIN_DIR, MANIFEST
from worker.settings import Settings


def resolve(settings: Settings, name_or_path: str) -> Path | str:
    """An installed bundle's directory for ``name_or_path``, or the argument unchanged."""
    installed = settings.effective_models_dir / name_or_path
    if "/" not in name_or_path and (installed / MANIFEST).is_file():
        return installed
    return name_or_path


def bundle(settings: Settings, name_or_path: str) -> Bundle:
    return load_bundle(resolve(settings, name_or_path))


def listing(settings: Settings) -> list[dict[str, Any]]:
    """Every bundle Pleura can find, built-in first, with what it is for."""
    rows = []
    for origin, root in (("built-in", BUILTIN_DIR), ("installed", settings.effective_models_dir)):
        if not root.is_dir():
            continue
        for path in sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()):
            try:
                b = load_bundle(path)
            except ValueError as exc:
                rows.append({"name": path.name, "origin": origin, "path": str(path), "error": str(exc)})
                continue
            rows.append({
                "name": b.name,
                "version": b.version,
                "origin": origin,
                "path": str(b.path),
                "sha256": b.sha256,
                "findings": [f.name for f in b.reported_findings],
                "heads": [f.name for f in b.head_findings],
                "intended_use": b.intended_use,
                "description": b.manifest.get("description", ""),
            })
    return rows


def verify(settings: Settings, name_or_path: str, backend: str) -> str:
    """Load on ``backend`` through the parity gate; raises ParityError with the reason."""
    engine = load(bundle(settings, name_or_path), backend=backend)
    assert engine.parity is not None
    return (f"{engine.bundle.name} {engine.bundle.version} on {engine.backend} ({engine.precision}): "
            f"parity PASSED - {engine.parity.describe()}")
