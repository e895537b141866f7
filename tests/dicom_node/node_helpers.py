"""Helpers shared by the dicom_node tests (imported by conftest and test modules)."""

from __future__ import annotations

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_modality_lut

from dicom_node.results.content import Code, FindingResult

CARDIOMEGALY = Code("8186001", "SCT", "Cardiomegaly")
EFFUSION = Code("60046008", "SCT", "Pleural effusion")
PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")
ABNORMAL = Code("263654008", "SCT", "Abnormal")


def decode_unit(ds: Dataset) -> np.ndarray:
    """Pixels as float32 in [0, 1], MONOCHROME2 (Modality LUT applied, MONOCHROME1 inverted)."""
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    low, high = float(values.min()), float(values.max())
    unit = (values - low) / max(high - low, 1e-6)
    return 1.0 - unit if ds.PhotometricInterpretation == "MONOCHROME1" else unit


def blob(shape: tuple[int, int] = (16, 16), centre: tuple[float, float] = (0.35, 0.3),
         sigma: float = 0.08) -> np.ndarray:
    """A Gaussian localization map in [0, 1]; ``centre`` is (row, column) as fractions."""
    rows, columns = np.mgrid[0:shape[0], 0:shape[1]]
    r, c = (rows + 0.5) / shape[0], (columns + 0.5) / shape[1]
    return np.exp(-((r - centre[0]) ** 2 + (c - centre[1]) ** 2) / (2 * sigma**2)).astype(
        np.float32
    )


def make_findings(seed: int = 0) -> tuple[FindingResult, ...]:
    """Cardiomegaly positive with a map, effusion negative with a map, pneumothorax
    positive without a map (probabilities shifted a little by ``seed``)."""
    shift = 0.01 * seed
    return (
        FindingResult("Cardiomegaly", CARDIOMEGALY, 0.83 - shift, 0.5, blob(centre=(0.6, 0.55))),
        FindingResult("Pleural effusion", EFFUSION, 0.21 + shift, 0.4, blob(centre=(0.8, 0.2))),
        FindingResult("Pneumothorax", PNEUMOTHORAX, 0.61 + shift, 0.55, None),
    )


