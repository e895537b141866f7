"""Localization maps: class activation maps cut back to each image's own extent.

A backend returns CAMs on the feature grid of the whole (letterboxed) model input. The
maps handed to callers cover exactly the original image instead: each output cell is
bilinearly sampled from the CAM at the point of the model input that corresponds to that
cell's centre in the image, so map row 0 is the image's top row and the padding is left out.
Values are ``sigmoid(local logit)``: a per-location probability on the same scale as the
finding's probability, not a per-image min-max stretch, so a confident negative stays dark.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engines.preprocess import Region


def _sampling_matrix(start: int, length: int, n_out: int, stride: int, n_cells: int) -> np.ndarray:
    """(n_out, n_cells) bilinear weights sampling cells at ``n_out`` centres over [start, start+length)."""
    centres = start + (np.arange(n_out) + 0.5) * (length / n_out)
    position = np.clip(centres / stride - 0.5, 0.0, n_cells - 1)
    return np.clip(1.0 - np.abs(position[:, None] - np.arange(n_cells)[None, :]), 0.0, None)


def image_maps(cam: np.ndarray, regions: Sequence[Region], stride: int, size: tuple[int, int]) -> np.ndarray:
    """(N, F, *size) float32 maps in [0, 1] covering each image, from (N, F, h, w) CAM logits."""
    _, _, h, w = cam.shape
    rows = np.stack([_sampling_matrix(r.top, r.height, size[0], stride, h) for r in regions])
    cols = np.stack([_sampling_matrix(r.left, r.width, size[1], stride, w) for r in regions])
    logits = np.einsum("nrh,nfhw,ncw->nfrc", rows, cam.astype(np.float64), cols)
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
