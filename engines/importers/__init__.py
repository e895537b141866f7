"""Importers: turn model files an operator downloaded into Pleura bundles.

Each importer module has ``import_bundle(source, out, *, name, version, progress, **options)``
returning the bundle directory; :func:`import_model` picks the module by kind and imports it
lazily, so an importer's optional dependencies are only needed when it is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Importer kind -> module implementing ``import_bundle``.
IMPORTERS = {
    "torchxrayvision": "engines.importers.xrv",
    "dinov2": "engines.importers.dinov2",
    "open_clip": "engines.importers.open_clip",
}

Progress = Callable[[str], None]


def import_model(
    kind: str,
    source: Path,
    out: Path,
    *,
    name: str,
    version: str,
    progress: Progress | None = None,
    **options: Any,
) -> Path:
    """Import the downloaded model at ``source`` as a bundle written to ``out``; returns ``out``.

    Raises ValueError for an unknown ``kind`` and FileNotFoundError if ``source`` does not exist.
    """
    if kind not in IMPORTERS:
        raise ValueError(f"unknown importer {kind!r}; known: {', '.join(sorted(IMPORTERS))}")
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory to import as {kind!r}")
    module = importlib.import_module(IMPORTERS[kind])
    return module.import_bundle(source, Path(out), name=name, version=version, progress=progress, **options)
