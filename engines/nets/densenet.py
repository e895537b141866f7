"""DenseNet (Huang et al. 2017) in plain PyTorch, with torchxrayvision's module names.

The state-dict keys are those of torchvision's and torchxrayvision's ``DenseNet``
(``features.conv0.weight``, ``features.denseblock1.denselayer1.norm1.weight``, ...,
``features.norm5.*``, ``classifier.*``), so their checkpoints load without renaming.
``forward`` returns what every Pleura architecture returns (see :mod:`engines.architectures`):
the embedding is the global average of ``relu(features(x))`` (torchxrayvision's
``features2``), the logits are ``classifier(embedding)`` and the CAM is the same final feature
map times the classifier weights plus its bias.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class _DenseLayer(nn.Sequential):
    """BN-ReLU-1x1 conv (bottleneck) then BN-ReLU-3x3 conv; the output is concatenated to the input."""

    def __init__(self, c_in: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(c_in))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module("conv1", nn.Conv2d(c_in, bn_size * growth_rate, 1, bias=False))
        self.add_module("norm2", nn.BatchNorm2d(bn_size * growth_rate))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module("conv2", nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.cat([x, super().forward(x)], 1)


class _Transition(nn.Sequential):
    """BN-ReLU-1x1 conv halving the channels, then 2x2 average pooling."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(c_in))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(c_in, c_out, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(2, 2))


class DenseNet(nn.Module):
    """DenseNet-BC (default: DenseNet-121, 1-channel input) with a linear per-finding classifier."""

    #: Output stride of ``features`` (conv0 and pool0, then three transitions).
    stride = 32

    def __init__(
        self,
        num_findings: int,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict(
            conv0=nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False),
            norm0=nn.BatchNorm2d(num_init_features),
            relu0=nn.ReLU(inplace=True),
            pool0=nn.MaxPool2d(3, 2, 1),
        )
        channels = num_init_features
        for i, n_layers in enumerate(block_config, start=1):
            block = nn.Sequential()
            for j in range(1, n_layers + 1):
                block.add_module(f"denselayer{j}", _DenseLayer(channels, growth_rate, bn_size))
                channels += growth_rate
            layers[f"denseblock{i}"] = block
            if i < len(block_config):
                layers[f"transition{i}"] = _Transition(channels, channels // 2)
                channels //= 2
        layers["norm5"] = nn.BatchNorm2d(channels)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(channels, num_findings)
        self.num_features = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = F.relu(self.features(x))
        embedding = features.mean(dim=(2, 3))
        logits = self.classifier(embedding)
        cam = F.conv2d(features, self.classifier.weight[:, :, None, None], self.classifier.bias)
        return embedding, logits, cam
