"""Preprocessing: letterbox geometry, value range, normalization, input checks."""

from __future__ import annotations

import numpy as np
import pytest

from engines.preprocess import (
    Region,
    check_image,
    letterbox,
    letterbox_region,
    normalize,
    preprocess,
    resample_matrix,
)

SPEC = {
    "size": [256, 256],
    "resize": {"policy": "letterbox", "pad_value": 0.0},
    "normalization": {"scheme": "mean_std", "mean": 0.5, "std": 0.25},
}


def test_letterbox_keeps_aspect_and_centres() -> None:
    region = letterbox_region((1955, 1841), (256, 256))  # rows x cols of a real CR
    assert region.height == 256 and region.width == round(1841 * 256 / 1955)
    assert region.left == (256 - region.width) // 2 and region.top == 0
    wide = letterbox_region((97, 211), (256, 256))
    assert (wide.width, wide.left) == (256, 0)
    assert abs(wide.height / wide.width - 97 / 211) < 1 / 256
    assert letterbox_region((1000, 3), (256, 256)).width == 1  # never zero-width


def test_letterbox_pads_outside_region_and_stays_in_range() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((1955, 1841), dtype=np.float32)
    out, region = letterbox(image, (256, 256), pad_value=0.0)
    assert out.shape == (256, 256) and out.dtype == np.float32
    inside = out[region.top : region.top + region.height, region.left : region.left + region.width]
    assert np.all(out[:, : region.left] == 0.0) and np.all(out[:, region.left + region.width :] == 0.0)
    assert 0.0 <= inside.min() and inside.max() <= 1.0
    assert abs(inside.mean() - image.mean()) < 0.01  # antialiased: averages, does not alias


def test_resize_preserves_constants_and_orientation() -> None:
    assert np.allclose(resample_matrix(1955, 256).sum(axis=1), 1.0)
    assert np.allclose(resample_matrix(64, 256).sum(axis=1), 1.0)
    image = np.zeros((400, 300), np.float32)
    image[:100] = 1.0  # bright top quarter
    out, region = letterbox(image, (256, 256), 0.0)
    rows = out[region.top : region.top + region.height, region.left + 10]
    assert rows[:60].min() > 0.99 and rows[70:].max() < 0.01


def test_preprocess_batch_shape_and_normalization() -> None:
    images = [np.full((1955, 1841), 0.5, np.float32), np.ones((97, 211), np.float32)]
    batch, regions = preprocess(images, SPEC)
    assert batch.shape == (2, 1, 256, 256) and batch.dtype == np.float32
    assert all(isinstance(r, Region) for r in regions)
    r = regions[1]
    assert np.allclose(batch[1, 0, r.top : r.top + r.height, r.left : r.left + r.width], 2.0)  # (1 - .5) / .25
    assert np.allclose(batch[1, 0, : r.top], -2.0)  # padding 0.0, normalized
    assert np.allclose(batch[0, 0, :, 128], 0.0, atol=1e-5)  # 0.5 stays 0.5 through the filter


def test_range_normalization() -> None:
    spec = {"scheme": "range", "low": -1024.0, "high": 1024.0}
    assert np.allclose(normalize(np.array([0.0, 0.5, 1.0]), spec), [-1024.0, 0.0, 1024.0])
    with pytest.raises(ValueError, match="unknown normalization scheme"):
        normalize(np.zeros(1), {"scheme": "other"})


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((2, 3, 3), np.float32), "expected a non-empty 2-D array"),
        (np.full((4, 4), 4095.0, np.float32), r"values span \[4095, 4095\].*scaled to \[0, 1\]"),
        (np.array([[0.0, np.nan]], np.float32), "NaN or infinite"),
        (np.array([["a"]]), "expected a numeric array"),
    ],
)
def test_check_image_rejects_bad_input(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_image(image, 3)
