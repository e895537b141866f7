"""Building blocks that the result builders take: plain values, no engine or ledger types.

The application (``worker``) translates engine output into these; ``dicom_node`` turns them
into DICOM objects. Keeping them plain lets ``dicom_node`` stay free of ``engines``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom import Dataset


@dataclass(frozen=True)
class Code:
    """A coded concept (value, scheme designator, meaning), e.g. SNOMED CT 8186001."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Algorithm:
    """What produced the result: model bundle name/version and the software around it."""

    name: str
    version: str
    manufacturer: str = "Pleura"
    software_version: str = "0"
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FindingResult:
    """One finding on one image: probability, operating threshold and localization map.

    ``heatmap`` is a low-resolution map in [0, 1] covering the whole source image (row 0 at
    the top), or None when the model gave none.
    """

    name: str
    code: Code
    probability: float
    threshold: float
    heatmap: np.ndarray | None = None

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class ImageResult:
    """All findings for one processed source image.

    ``source`` is the source instance's dataset (pixel data may be absent); ``pixels`` is the
    decoded image as float32 in [0, 1], MONOCHROME2 (used to draw the Secondary Capture).
    """

    source: Dataset
    pixels: np.ndarray
    findings: tuple[FindingResult, ...]
