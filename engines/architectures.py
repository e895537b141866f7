"""Model architectures in plain PyTorch, built from a manifest's ``architecture`` entry.

Every architecture's ``forward`` returns the three tensors that both backends serve
(and that the ONNX graph outputs, under the same names):

- ``embedding`` (N, D): the globally average-pooled final feature map;
- ``logits`` (N, F): one linear head per finding on the embedding;
- ``cam`` (N, F, h, w): class activation maps, the final feature map times the head weights
  plus the head bias (Zhou et al. 2016; Wang et al., ChestX-ray8, 2017). Because the
  embedding is a plain average, ``cam.mean((2, 3)) == logits``: each map is the image's
  logit resolved by location.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from engines.nets.densenet import DenseNet
from engines.nets.vit import ViTLinear, ViTZeroShot


def _conv(c_in: int, c_out: int, stride: int = 1, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding=dilation * (kernel // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class CamCNN(nn.Module):
    """A small grayscale CNN encoder with linear per-finding heads and class activation maps.

    Each stage but the last halves the resolution with a strided 3x3 convolution, and all
    but the first then add a second 3x3 convolution. The last stage keeps the resolution
    and widens the receptive field instead (3x3 with dilation 2, then 1x1), so the maps are
    twice as fine as a plain strided stage would give. Output stride: ``2 ** (len(widths) - 1)``.
    """

    def __init__(self, num_findings: int, widths: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        last = len(widths) - 1
        for i, width in enumerate(widths):
            if i < last:
                layers.append(_conv(c_in, width, stride=2))
                if i > 0:
                    layers.append(_conv(width, width))
            else:
                layers += [_conv(c_in, width, dilation=2), _conv(width, width, kernel=1)]
            c_in = width
        self.encoder = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c_in, num_findings)
        self.stride = 2**last

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        embedding = features.mean(dim=(2, 3))
        logits = self.head(self.dropout(embedding))
        cam = F.conv2d(features, self.head.weight[:, :, None, None], self.head.bias)
        return embedding, logits, cam


_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "cam_cnn": CamCNN,
    "densenet": DenseNet,
    "vit_linear": ViTLinear,
    "vit_zero_shot": ViTZeroShot,
}


def build(spec: Mapping[str, Any], num_findings: int) -> nn.Module:
    """The untrained model described by a manifest's ``architecture`` entry."""
    params = dict(spec)
    name = params.pop("name")
    try:
        cls = _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(_ARCHITECTURES)}") from None
    return cls(num_findings=num_findings, **params)
