"""The prepared cache: one image's display pixels and model outputs, computed when it arrived.

An entry is addressed by content and model,
``<data dir>/prepared/<bundle>-<version>-<model sha256[:16]>/<instance sha256>.npz``, so an
instance whose bytes changed, or a new bundle (weights, heads or thresholds), simply misses.
It is a cache: a study's job deletes its images' entries once it has succeeded, a missing or
unusable entry only means the job decodes and infers that image itself. Entries no job took (a
study that failed for good, an instance whose bytes changed) are removed by :func:`prune` after
:data:`ORPHAN_SECONDS`.

While a hint computes an entry it holds a marker (``.<sha256>.preparing``); a job that finds the
marker and no entry waits for it (:meth:`PreparedCache.load_when_ready`) rather than decoding and
inferring the same image a second time on the same cores.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from pydicom import Dataset

from dicom_node.results.content import Code, FindingResult, ImageResult
from engines import Bundle, FindingSpec, InferenceResult
from worker.leases import held_by_the_dead, owner
from worker.settings import Settings

log = structlog.get_logger(__name__)

#: Age after which an entry is an orphan: the listener's sweeper removes it (see :func:`prune`).
ORPHAN_SECONDS = 24 * 3600
#: How long after a marker was made a job still waits for its entry; past it the hint is taken
#: for dead (a killed worker on another host) or hopelessly late, and the job computes the image.
PREPARING_SECONDS = 5.0
_POLL_SECONDS = 0.02
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Prepared:
    """What the job needs of one image besides its header; ``maps`` has a map for the first
    findings only (the encoder's; a head's finding has none)."""

    pixels: np.ndarray  # float32 at the SC's image size (dicom_node.results.sc.display_image)
    findings: tuple[str, ...]
    probabilities: np.ndarray  # (F,) float32
    maps: np.ndarray  # (F_encoder, h, w) float32
    embedding: np.ndarray  # (D,) float32

    @classmethod
    def from_output(cls, out: InferenceResult, row: int, pixels: np.ndarray) -> Prepared:
        """Image ``row`` of an engine result, with its display image."""
        return cls(pixels, tuple(out.findings), out.probabilities[row], out.maps[row], out.embeddings[row])

    def image_result(self, source: Dataset, specs: Mapping[str, FindingSpec]) -> ImageResult:
        """The result the SR and SC are built from, with the bundle's codes and thresholds."""
        findings = tuple(
            FindingResult(
                name=name,
                code=Code(specs[name].code_value, specs[name].code_scheme, specs[name].code_meaning),
                probability=float(self.probabilities[col]),
                threshold=float(specs[name].threshold),
                heatmap=self.maps[col] if col < len(self.maps) else None,
            )
            for col, name in enumerate(self.findings)
        )
        return ImageResult(source=source, pixels=self.pixels, findings=findings)


def root(settings: Settings) -> Path:
    """The folder that holds every model's entries."""
    return settings.data_dir / "prepared"


def prune(folder: Path, older_than_seconds: float = ORPHAN_SECONDS) -> int:
    """Remove the entries (and temporary files) of every model in ``folder`` older than
    ``older_than_seconds``; return how many were removed."""
    cutoff = time.time() - older_than_seconds
    removed = 0
    for path in folder.glob("*/*"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except OSError:  # removed meanwhile by its job, or not ours to remove: the next prune tries again
            continue
    if removed:
        log.info("orphaned prepared entries removed", entries=removed)
    return removed


class PreparedCache:
    """The entries of one model, in one folder."""

    def __init__(self, folder: Path, findings: tuple[str, ...]) -> None:
        self.folder = folder
        self.findings = findings  # an entry with other findings is not this model's

    @classmethod
    def of(cls, settings: Settings, bundle: Bundle) -> PreparedCache:
        label = _UNSAFE.sub("_", f"{bundle.name}-{bundle.version}")
        return cls(root(settings) / f"{label}-{bundle.model_sha256[:16]}",
                   tuple(f.name for f in bundle.reported_findings))

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise ValueError("an instance sha256 is 64 lower-case hex digits")
        return self.folder / f"{sha256}.npz"

    def marker(self, sha256: str) -> Path:
        return self.folder / f".{self.path(sha256).stem}.preparing"

    @contextmanager
    def preparing(self, sha256: str) -> Iterator[bool]:
        """Hold the marker of an entry being computed; yields False when another hint holds it."""
        marker = self.marker(sha256)
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            yield False
            return
        with os.fdopen(fd, "w") as fh:  # who holds it: a job does not wait on a dead process's marker
            fh.write(owner())
        try:
            yield True
        finally:
            marker.unlink(missing_ok=True)

    def load_when_ready(self, sha256: str) -> Prepared | None:
        """:meth:`load`, after waiting for a hint that is computing the entry: while its marker is
        younger than :data:`PREPARING_SECONDS` and its holder is not a dead predecessor of this
        process (worker.assemble.recovery: a ``kill -9`` leaves the marker behind)."""
        marker = self.marker(sha256)
        while not self.path(sha256).is_file():
            try:
                age = time.time() - marker.stat().st_mtime
                holder = marker.read_text()
            except FileNotFoundError:
                break  # no hint at work (or it just finished: the entry is read below)
            if age > PREPARING_SECONDS or held_by_the_dead(holder):
                break
            time.sleep(_POLL_SECONDS)
        return self.load(sha256)

    def __contains__(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def load(self, sha256: str) -> Prepared | None:
        """The entry, or None when there is none or it cannot be used (logged by error type)."""
        try:
            with np.load(self.path(sha256), allow_pickle=False) as data:
                entry = Prepared(data["pixels"], tuple(str(f) for f in data["findings"]), data["probabilities"],
                                 data["maps"], data["embedding"])
            self._check(entry)
        except FileNotFoundError:
            return None
        except Exception as exc:  # truncated, foreign or damaged file: the job recomputes
            log.warning("prepared entry unusable; the image is decoded and inferred again", error=type(exc).__name__)
            return None
        return entry

    def store(self, sha256: str, entry: Prepared) -> None:
        """Write the entry atomically (temporary file, then rename): readers see all or nothing."""
        path = self.path(sha256)
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{sha256[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, pixels=entry.pixels, findings=np.array(entry.findings, dtype=str),
                         probabilities=entry.probabilities, maps=entry.maps, embedding=entry.embedding)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def discard(self, sha256s: Iterable[str]) -> None:
        """Remove these entries; one that cannot be removed is logged, never the caller's failure."""
        for sha256 in sha256s:
            try:
                self.path(sha256).unlink(missing_ok=True)
            except (OSError, ValueError) as exc:
                log.warning("prepared entry not removed", error=type(exc).__name__)

    def _check(self, entry: Prepared) -> None:
        arrays = (entry.pixels, entry.probabilities, entry.maps, entry.embedding)
        if any(a.dtype != np.float32 for a in arrays):
            raise ValueError("arrays are not float32")
        if entry.findings != self.findings or entry.probabilities.shape != (len(self.findings),):
            raise ValueError("findings differ from the bundle's")
        if entry.pixels.ndim != 2 or entry.maps.ndim != 3 or len(entry.maps) > len(self.findings):
            raise ValueError("array shapes are not those of an image's outputs")
        if entry.embedding.ndim != 1:
            raise ValueError("embedding is not a vector")
