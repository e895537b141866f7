"""Fixtures for dicom_node tests: the shared real data, validators, model-like results."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset

from dicom_node.results.content import Algorithm, FindingResult, ImageResult
from tests.dicom_node.node_helpers import (
    ABNORMAL,
    decode_unit,
    make_findings,
)
from tests.support import NIH, REAL_CR


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def rg1() -> Dataset:
    """The real Philips CR (MONOCHROME1, 15 bit, lossy JPEG 2000)."""
    return pydicom.dcmread(_require(REAL_CR))


@pytest.fixture(scope="session")
def nih_dir() -> Path:
    return _require(NIH / "labels.csv").parent


@pytest.fixture
def algorithm() -> Algorithm:
    return Algorithm(name="demo", version="0.1.0", software_version="0.1.0",
                     parameters={"input_size": "224", "heads": "linear"})


@pytest.fixture
def summary() -> FindingResult:
    return FindingResult("Any abnormality", ABNORMAL, 0.88, 0.5)


@pytest.fixture(scope="session")
def rg1_result(rg1: Dataset) -> ImageResult:
    return ImageResult(source=rg1, pixels=decode_unit(rg1), findings=make_findings())


