"""Shared fixtures for the engines tests: the built-in demo bundle and the real-data location."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engines import Bundle, Engine, load, load_bundle

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
NIH = DATA / "nih-cxr14-sample"


@pytest.fixture(scope="session")
def demo() -> Bundle:
    return load_bundle("demo")


@pytest.fixture(scope="session")
def ort_engine(demo: Bundle) -> Engine:
    return load(demo, backend="onnxruntime")


@pytest.fixture(scope="session")
def torch_engine(demo: Bundle) -> Engine:
    return load(demo, backend="torch")


@pytest.fixture
def demo_copy(demo: Bundle, tmp_path: Path) -> Path:
    """A writable copy of the demo bundle directory."""
    return Path(shutil.copytree(demo.path, tmp_path / "demo"))


@pytest.fixture(scope="session")
def nih() -> Path:
    if not (NIH / "labels.csv").is_file():
        pytest.skip(f"real NIH ChestX-ray14 sample not found at {NIH} (see ../shared/data/README.md)")
    return NIH
