"""Inference: shapes, ranges, batching, real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines import Engine, InferenceResult


def _check(result: InferenceResult, engine: Engine, n: int) -> None:
    f = len(engine.bundle.findings)
    assert result.findings == tuple(s.name for s in engine.bundle.findings)
    assert result.embeddings.shape == (n, engine.bundle.manifest["outputs"]["embedding_dim"])
    assert result.probabilities.shape == (n, f)
    assert result.maps.shape == (n, f, *engine.bundle.manifest["outputs"]["map"]["size"])
    for array in (result.embeddings, result.probabilities, result.maps):
        assert array.dtype == np.float32 and np.isfinite(array).all()
    if n:
        assert 0.0 <= result.probabilities.min() and result.probabilities.max() <= 1.0
        assert 0.0 <= result.maps.min() and result.maps.max() <= 1.0


def test_real_nih_image(ort_engine: Engine, nih: Path) -> None:
    with Image.open(nih / "images" / "00000075_000.png") as im:
        image = np.asarray(im.convert("L"), dtype=np.float32) / 255.0

    def resized(rows: int, cols: int) -> np.ndarray:
        return np.asarray(Image.fromarray(image, mode="F").resize((cols, rows), Image.BILINEAR)).clip(0, 1)

    # the radiograph as stored, enlarged 4x, and stretched to a real CR matrix (1955 rows x 1841 columns)
    result = ort_engine.infer([image, resized(2048, 2048), resized(1955, 1841)])
    _check(result, ort_engine, 3)
    assert np.abs(result.probabilities[0] - result.probabilities[1]).max() < 0.02  # matrix size barely matters
    assert np.abs(result.maps[0] - result.maps[1]).max() < 0.05
    assert result.embeddings.std() > 0


def test_mixed_sizes_batch_equals_one_by_one(ort_engine: Engine) -> None:
    rng = np.random.default_rng(1)
    images = [rng.random(shape, dtype=np.float32) for shape in [(300, 200), (128, 128), (200, 333)]]
    together = ort_engine.infer(images)
    _check(together, ort_engine, 3)
    for i, image in enumerate(images):
        alone = ort_engine.infer([image])
        assert np.allclose(alone.probabilities[0], together.probabilities[i], atol=1e-5)
        assert np.allclose(alone.maps[0], together.maps[i], atol=1e-5)


def test_batches_larger_than_max_batch_and_empty(ort_engine: Engine) -> None:
    images = [np.full((64, 64), v, np.float32) for v in np.linspace(0, 1, ort_engine.max_batch + 3)]
    _check(ort_engine.infer(images), ort_engine, len(images))
    _check(ort_engine.infer([]), ort_engine, 0)


def test_out_of_range_pixels_are_refused(ort_engine: Engine) -> None:
    with pytest.raises(ValueError, match=r"image 1: values span \[0, 4095\]"):
        ort_engine.infer([np.zeros((8, 8), np.float32), np.linspace(0, 4095, 64, dtype=np.float32).reshape(8, 8)])


def test_one_large_image_alone(ort_engine: Engine) -> None:
    """A real CR matrix (1955 x 1841) as a batch of its own: valid outputs, the same each time. How long
    it takes (about 0.05 s on CPU) is bench.engines' ``large_image`` figure, not a check here."""
    image = np.random.default_rng(2).random((1955, 1841), dtype=np.float32)
    first, second = ort_engine.infer([image]), ort_engine.infer([image])
    _check(first, ort_engine, 1)
    np.testing.assert_array_equal(first.probabilities, second.probabilities)
    np.testing.assert_array_equal(first.maps, second.maps)
