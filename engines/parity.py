"""The parity gate: a backend serves patients only if it reproduces the bundle's golden outputs.

``golden.npz`` holds a few non-patient input images (``input_0``, ``input_1``, ... of varied
sizes, so that preprocessing is checked too) and the reference ``embeddings``,
``probabilities`` and ``maps`` computed when the bundle was built. The engine under test runs
the full pixels-to-numbers path on those inputs, and every output must lie within the
manifest's ``parity.tolerance`` for the backend's precision (max absolute difference).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from engines.bundle import Bundle, BundleError

if TYPE_CHECKING:
    from engines.runtime import Engine

OUTPUTS = ("embeddings", "probabilities", "maps")


class ParityError(RuntimeError):
    """A backend's outputs on the golden inputs differ from the reference beyond tolerance."""


@dataclass(frozen=True)
class ParityReport:
    """How far a backend's outputs on the golden inputs are from the reference, per output."""

    backend: str
    precision: str
    max_abs_diff: dict[str, float]
    tolerance: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(self.max_abs_diff[k] <= self.tolerance[k] for k in OUTPUTS)

    def describe(self) -> str:
        return ", ".join(
            f"{k} max abs diff {self.max_abs_diff[k]:.3g} "
            f"{'<=' if self.max_abs_diff[k] <= self.tolerance[k] else 'EXCEEDS'} tolerance {self.tolerance[k]:g}"
            for k in OUTPUTS
        )


def golden(bundle: Bundle) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """The bundle's golden input images and reference outputs."""
    path = bundle.file("golden")
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: cannot read golden inputs ({exc})") from exc
    inputs = [arrays[f"input_{i}"] for i in range(sum(k.startswith("input_") for k in arrays))]
    missing = [k for k in OUTPUTS if k not in arrays]
    if not inputs or missing:
        wanted = f"input_0, input_1, ... and {', '.join(OUTPUTS)}"
        raise BundleError(f"{path}: needs {wanted}; missing {missing or 'inputs'}")
    return inputs, {k: arrays[k] for k in OUTPUTS}


def check(engine: Engine) -> ParityReport:
    """Run ``engine`` on its bundle's golden inputs and measure the distance to the reference."""
    bundle = engine.bundle
    inputs, reference = golden(bundle)
    result = engine.infer(inputs)
    diffs = {}
    for key in OUTPUTS:
        got, want = getattr(result, key), reference[key]
        if got.shape != want.shape:
            raise ParityError(
                f"backend {engine.backend} fails the parity gate of bundle {bundle.name} {bundle.version}: "
                f"{key} has shape {got.shape}, the reference {want.shape}; the bundle's golden file "
                "does not belong to this model, rebuild or reinstall the bundle"
            )
        diffs[key] = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
    tolerance = bundle.manifest["parity"]["tolerance"][engine.precision]
    return ParityReport(engine.backend, engine.precision, diffs, {k: float(tolerance[k]) for k in OUTPUTS})


def verify(engine: Engine) -> ParityReport:
    """:func:`check`, raising :class:`ParityError` with a clear message if the engine fails."""
    report = check(engine)
    if not report.passed:
        bundle = engine.bundle
        raise ParityError(
            f"backend {report.backend} ({report.precision}) fails the parity gate of bundle "
            f"{bundle.name} {bundle.version} (sha256 {bundle.sha256[:12]}): {report.describe()}. "
            "Its outputs on the golden inputs do not match the reference, so it must not be used; "
            f"check or reinstall the bundle at {bundle.path}, or choose another backend"
        )
    return report
