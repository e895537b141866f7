"""Cache of serialized TensorRT plans, one file per (bundle, TensorRT, GPU, precision, shapes).

A plan is only valid for the exact TensorRT version and GPU it was built on, so every one of
those goes into the key; a changed bundle (new sha256) or profile builds a new plan. The cache
directory is ``$PLEURA_TRT_CACHE`` if set, else ``$XDG_CACHE_HOME/pleura/trt`` (default
``~/.cache/pleura/trt``). Plans are written atomically (temp file, fsync, rename), so a crash
never leaves half a plan under its final name; a JSON sidecar records what the key was made of.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

Shape = tuple[int, ...]


@dataclass(frozen=True)
class PlanKey:
    """Everything a TensorRT plan depends on."""

    bundle_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # e.g. "9.0"
    precision: str  # "fp32" or "fp16"
    min_shape: Shape
    opt_shape: Shape
    max_shape: Shape

    def digest(self) -> str:
        """SHA-256 over the key's fields in a fixed, unambiguous (JSON) encoding."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    """Where plans live: ``$PLEURA_TRT_CACHE``, else ``$XDG_CACHE_HOME/pleura/trt``."""
    if os.environ.get("PLEURA_TRT_CACHE"):
        return Path(os.environ["PLEURA_TRT_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "pleura" / "trt"


def plan_path(key: PlanKey, root: Path | None = None) -> Path:
    """The plan file for ``key``: ``<root>/<digest>.plan``."""
    return (root or cache_dir()) / f"{key.digest()}.plan"


def read(key: PlanKey, root: Path | None = None) -> bytes | None:
    """The cached plan for ``key``, or None if it has not been built here yet."""
    path = plan_path(key, root)
    return path.read_bytes() if path.is_file() else None


def write(key: PlanKey, plan: bytes, root: Path | None = None) -> Path:
    """Store ``plan`` for ``key`` atomically, with a ``.json`` sidecar describing the key."""
    path = plan_path(key, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path.with_suffix(".json"), json.dumps(asdict(key), indent=2).encode())
    _atomic_write(path, plan)
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
