"""Pixels to model input, as a bundle's manifest says.

Input images are 2-D float arrays, MONOCHROME2 (bright = dense), scaled to [0, 1], of any
size. Two geometry policies (``input.resize.policy``):

- ``letterbox``: scale the image so that it fits the model input with its aspect ratio kept,
  centre it, and fill the rest with ``pad_value``. Nothing is cropped.
- ``center_crop``: cut the largest centred window with the model input's aspect ratio (a
  square for a square input, at torchxrayvision's ``XRayCenterCrop`` offsets), then scale it
  to the model input.

Each image's :class:`Region` tells where it lies in the model input (used to cut localization
maps back to exactly the image's extent); after a crop it extends beyond the input.

Resampling is separable and antialiased: a triangle (tent) filter whose support widens with
the reduction factor, applied as two small matrix products (bilinear when enlarging).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np

ArrayLike = TypeVar("ArrayLike")


@dataclass(frozen=True)
class Region:
    """Where an image lies in the model input: rows [top, top+height), cols [left, left+width).

    ``top``/``left`` are negative and the extent larger than the input when the image was cropped.
    """

    top: int
    left: int
    height: int
    width: int


def check_image(image: np.ndarray, index: int = 0) -> np.ndarray:
    """``image`` as float32 after checking it is 2-D, finite and within [0, 1]."""
    array = np.asarray(image)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"image {index}: expected a non-empty 2-D array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"image {index}: expected a numeric array, got dtype {array.dtype}")
    array = array.astype(np.float32, copy=False)
    lo, hi = float(array.min()), float(array.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"image {index}: contains NaN or infinite values")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"image {index}: values span [{lo:g}, {hi:g}]; engines expect MONOCHROME2 pixels "
            "scaled to [0, 1] (apply the Modality/VOI LUT and divide by the maximum first)"
        )
    return array


@lru_cache(maxsize=16)
def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of an antialiased tent filter mapping n_in samples to n_out."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    positions = np.arange(n_in, dtype=np.float64) + 0.5
    weights = np.clip(1.0 - np.abs(positions[None, :] - centres[:, None]) / support, 0.0, None)
    matrix = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    matrix.setflags(write=False)
    return matrix


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` (2-D float32) resampled to (height, width)."""
    rows = resample_matrix(image.shape[0], height)
    cols = resample_matrix(image.shape[1], width)
    h, w = image.shape
    if height * w * (h + width) <= width * h * (w + height):  # fewer multiply-adds first
        return (rows @ image) @ cols.T
    return rows @ (image @ cols.T)


def letterbox_region(shape: tuple[int, int], size: tuple[int, int]) -> Region:
    """The centred, aspect-preserving region an image of ``shape`` occupies in ``size``."""
    (h, w), (out_h, out_w) = shape, size
    scale = min(out_h / h, out_w / w)
    height = min(out_h, max(1, round(h * scale)))
    width = min(out_w, max(1, round(w * scale)))
    return Region(top=(out_h - height) // 2, left=(out_w - width) // 2, height=height, width=width)


def letterbox(image: np.ndarray, size: tuple[int, int], pad_value: float) -> tuple[np.ndarray, Region]:
    """``image`` fitted into ``size`` (height, width) with its aspect kept, and its region."""
    region = letterbox_region(image.shape, size)
    canvas = np.full(size, pad_value, dtype=np.float32)
    canvas[region.top : region.top + region.height, region.left : region.left + region.width] = resize(
        image, region.height, region.width
    )
    return canvas, region


def normalize(x: ArrayLike, normalization: Mapping[str, Any]) -> ArrayLike:
    """Map [0, 1] pixels to the model's input scale (numpy arrays or torch tensors).

    Schemes: ``mean_std`` ((x - mean) / std) and ``range`` ([0, 1] linearly onto [low, high],
    e.g. torchxrayvision's [-1024, 1024]).
    """
    scheme = normalization["scheme"]
    if scheme == "mean_std":
        return (x - normalization["mean"]) / normalization["std"]  # type: ignore[operator]
    if scheme == "range":
        low, high = normalization["low"], normalization["high"]
        return x * (high - low) + low  # type: ignore[operator]
    raise ValueError(f"unknown normalization scheme {scheme!r}; expected 'mean_std' or 'range'")


def center_crop(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, Region]:
    """The largest centred window of ``image`` with the aspect of ``size``, scaled to ``size``.

    Offsets follow torchxrayvision's ``XRayCenterCrop`` (``n // 2 - crop // 2``). The region is
    where the whole image lies relative to the model input.
    """
    (h, w), (out_h, out_w) = image.shape, size
    if h * out_w >= w * out_h:
        crop_h, crop_w = max(1, min(h, round(w * out_h / out_w))), w
    else:
        crop_h, crop_w = h, max(1, min(w, round(h * out_w / out_h)))
    top, left = h // 2 - crop_h // 2, w // 2 - crop_w // 2
    scale_h, scale_w = out_h / crop_h, out_w / crop_w
    region = Region(
        top=-round(top * scale_h), left=-round(left * scale_w), height=round(h * scale_h), width=round(w * scale_w)
    )
    return resize(image[top : top + crop_h, left : left + crop_w], out_h, out_w), region


def geometry(images: Sequence[np.ndarray], input_spec: Mapping[str, Any]) -> tuple[np.ndarray, list[Region]]:
    """Checked images fitted into an (N, H, W) float32 batch in [0, 1] by the resize policy, and their regions."""
    size = tuple(input_spec["size"])
    resize_spec = input_spec["resize"]
    policy = resize_spec.get("policy", "letterbox")
    if policy not in ("letterbox", "center_crop"):
        raise ValueError(f"unknown resize policy {policy!r}; expected 'letterbox' or 'center_crop'")
    batch = np.empty((len(images), *size), dtype=np.float32)
    regions = []
    for i, image in enumerate(images):
        checked = check_image(image, i)
        if policy == "center_crop":
            batch[i], region = center_crop(checked, size)  # type: ignore[arg-type]
        else:
            batch[i], region = letterbox(checked, size, float(resize_spec["pad_value"]))  # type: ignore[arg-type]
        regions.append(region)
    return batch, regions


def preprocess(images: Sequence[np.ndarray], input_spec: Mapping[str, Any]) -> tuple[np.ndarray, list[Region]]:
    """Model input (N, 1, H, W) float32 for ``images``, and where each image lies in it."""
    batch, regions = geometry(images, input_spec)
    return normalize(batch, input_spec["normalization"])[:, None].astype(np.float32), regions
