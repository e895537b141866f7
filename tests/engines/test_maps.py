"""Class activation maps: architecture identity and cutting maps back to the image extent."""

from __future__ import annotations

import numpy as np
import torch

from engines.architectures import build
from engines.maps import image_maps
from engines.preprocess import Region


def test_cam_mean_equals_logit() -> None:
    torch.manual_seed(0)
    model = build({"name": "cam_cnn", "widths": [8, 16, 16, 24, 32]}, num_findings=3).eval()
    with torch.inference_mode():
        embedding, logits, cam = model(torch.randn(2, 1, 128, 128))
    assert embedding.shape == (2, 32) and logits.shape == (2, 3) and cam.shape == (2, 3, 8, 8)
    assert torch.allclose(cam.mean(dim=(2, 3)), logits, atol=1e-5)


def test_maps_cover_only_the_image_and_keep_row_0_on_top() -> None:
    cam = np.full((1, 1, 16, 16), 10.0, np.float32)  # stride 16 over a 256x256 input
    cam[..., 4:12] = -10.0  # image occupies columns 64..191; the rest is padding
    cam[:, :, :2, 4:12] = 4.0  # the image's top rows are "hot"
    maps = image_maps(cam, [Region(top=0, left=64, height=256, width=128)], stride=16, size=(32, 32))
    assert maps.shape == (1, 1, 32, 32) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0
    interior = maps[0, 0, :, 4:28]
    assert interior[:3].min() > 0.9  # top of the map = top of the image
    assert interior[8:].max() < 1e-3  # padding (+10) does not leak into the interior
    assert np.allclose(maps[0, 0, 8:, 4:28], 1 / (1 + np.exp(10.0)), atol=1e-6)
