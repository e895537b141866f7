"""Loading a bundle onto a backend behind the parity gate, and running inference."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines import backends, maps, parity
from engines.backends import Backend, BackendUnavailable
from engines.bundle import Bundle, BundleError, load_bundle
from engines.heads.serving import apply_heads, served_heads
from engines.preprocess import preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceResult:
    """Outputs for N images; finding axes follow ``findings`` (the bundle's reported order: the
    encoder's findings, then its heads'). Only the encoder's findings have maps."""

    findings: tuple[str, ...]
    embeddings: np.ndarray  # (N, D) float32
    probabilities: np.ndarray  # (N, F) float32 in [0, 1]
    maps: np.ndarray  # (N, F_encoder, h, w) float32 in [0, 1], each covering its whole image, row 0 = top

    def heatmap(self, row: int, col: int) -> np.ndarray | None:
        """The map of finding ``col`` in image ``row``, or None for a head's finding (it has none)."""
        return self.maps[row, col] if col < self.maps.shape[1] else None


class Engine:
    """A bundle loaded on one backend. Use :func:`load`, which runs the parity gate first."""

    def __init__(self, bundle: Bundle, backend: Backend, max_batch: int = 16) -> None:
        self.bundle = bundle
        self._backend = backend
        self.max_batch = max_batch
        #: Set by :func:`load` once the engine has passed the parity gate.
        self.parity: parity.ParityReport | None = None
        #: Why :func:`load` chose this backend (what ``auto`` skipped or refused, and why).
        self.selection_reason = ""
        out = bundle.manifest["outputs"]
        self._embedding_dim = int(out["embedding_dim"])
        self._map_size = tuple(out["map"]["size"])
        self._stride = int(out["map"]["feature_stride"])
        self._heads = served_heads(bundle.manifest.get("heads", []))

    @property
    def backend(self) -> str:
        """What actually runs, e.g. ``"onnxruntime:CPUExecutionProvider"``."""
        return self._backend.name

    @property
    def artifact(self) -> Path | None:
        """The prebuilt file the backend runs from (a TensorRT plan), if it has one."""
        return getattr(self._backend, "artifact", None)

    @property
    def precision(self) -> str:
        """``"fp32"`` or ``"fp16"``: the precision the backend computes in."""
        return self._backend.precision

    def infer(self, images: Sequence[np.ndarray]) -> InferenceResult:
        """Run the model on 2-D MONOCHROME2 float images in [0, 1] of any size."""
        names = tuple(f.name for f in self.bundle.reported_findings)
        parts = [self._infer_batch(images[i : i + self.max_batch]) for i in range(0, len(images), self.max_batch)]
        if not parts:
            n = len(self.bundle.findings)
            embeddings = np.zeros((0, self._embedding_dim), np.float32)
            probabilities, cams = np.zeros((0, n), np.float32), np.zeros((0, n, *self._map_size), np.float32)
        else:
            embeddings, probabilities, cams = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
        probabilities = np.concatenate([probabilities, apply_heads(self._heads, embeddings)], axis=1)
        return InferenceResult(names, embeddings, probabilities, cams)

    def _infer_batch(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batch, regions = preprocess(images, self.bundle.manifest["input"])
        raw = self._backend.run(batch)
        probabilities = (1.0 / (1.0 + np.exp(-raw.logits.astype(np.float64)))).astype(np.float32)
        cams = maps.image_maps(raw.cam, regions, self._stride, self._map_size)
        return raw.embedding.astype(np.float32, copy=False), probabilities, cams


def load(bundle: Bundle | str | Path, backend: str = "auto") -> Engine:
    """Load ``bundle`` (a :class:`Bundle`, built-in name or path) on a backend that passes parity.

    ``backend`` is ``"auto"``, ``"tensorrt"``, ``"onnxruntime"`` or ``"torch"``. A named backend
    that fails the parity gate raises :class:`ParityError`; ``auto`` tries
    :func:`backends.auto_order` (fastest first) in turn, records why it chose what it did in
    :attr:`Engine.selection_reason`, and raises ParityError only if every available backend fails.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    if backend != "auto":
        engine = _gated(bundle, backend)
        engine.selection_reason = f"backend {backend!r} requested"
        return engine
    notes = [f"{kind} skipped: {reason}" for kind, reason in backends.skipped_by_auto().items()]
    for note in notes:
        log.info("auto: %s", note)
    order = backends.auto_order(bundle)
    failures = []
    for kind in order:
        try:
            engine = _gated(bundle, kind)
        except BackendUnavailable as exc:
            log.info("backend %s unavailable: %s", kind, exc)
            notes.append(f"{kind} unavailable: {exc}")
        except parity.ParityError as exc:
            log.warning("backend %s refused: %s", kind, exc)
            failures.append(str(exc))
            notes.append(f"{kind} refused by the parity gate")
        else:
            engine.selection_reason = "; ".join(
                [f"first in auto's order ({' > '.join(order)}, fastest first) to load and pass the parity gate",
                 *notes]
            )
            log.info(
                "auto selected backend %s for bundle %s %s (%s)",
                engine.backend, bundle.name, bundle.version, engine.selection_reason,
            )
            return engine
    if failures:
        raise parity.ParityError(" | ".join(failures))
    raise BackendUnavailable(
        f"no backend can run here ({'; '.join(notes)}); install one of {', '.join(backends.KINDS)}"
    )


@dataclass(frozen=True)
class BackendCheck:
    """One backend's answer to the parity gate: ``passed``, ``failed`` or ``unavailable`` here."""

    kind: str
    status: str
    #: what ran (e.g. ``onnxruntime:CPUExecutionProvider``) and its precision; None when unavailable
    backend: str | None
    precision: str | None
    #: the distances to the reference, the error, or why the backend cannot run here
    detail: str
    report: parity.ParityReport | None = None

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "status": self.status, "backend": self.backend, "precision": self.precision,
                "detail": self.detail,
                "max_abs_diff": self.report.max_abs_diff if self.report else None,
                "tolerance": self.report.tolerance if self.report else None}


def check_backends(bundle: Bundle, kinds: Sequence[str] = backends.KINDS) -> list[BackendCheck]:
    """Run the parity gate of ``bundle`` on each backend of ``kinds`` that can run here."""
    checks = []
    for kind in kinds:
        try:
            engine = Engine(bundle, backends.create(kind, bundle))
        except BackendUnavailable as exc:
            checks.append(BackendCheck(kind, "unavailable", None, None, str(exc)))
            continue
        except BundleError as exc:  # the backend cannot load the bundle's files
            checks.append(BackendCheck(kind, "failed", None, None, str(exc)))
            continue
        try:
            report = parity.check(engine)
        except Exception as exc:  # whatever a backend raises on the golden inputs fails the gate
            checks.append(BackendCheck(kind, "failed", engine.backend, engine.precision,
                                       f"{type(exc).__name__}: {exc}"))
            continue
        checks.append(BackendCheck(kind, "passed" if report.passed else "failed", engine.backend,
                                   engine.precision, report.describe(), report))
    return checks


def _gated(bundle: Bundle, kind: str) -> Engine:
    engine = Engine(bundle, backends.create(kind, bundle))
    engine.parity = parity.verify(engine)
    return engine
