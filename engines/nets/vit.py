"""Vision transformers in plain PyTorch for imported DINOv2-family and CLIP-family encoders.

:class:`ViT` is the pre-norm ViT shared by Hugging Face DINOv2 (RAD-DINO, facebook/dinov2-*)
and the timm ViT image tower of open_clip models (BiomedCLIP). It takes the bundle's
grayscale input in [0, 1], replicates it to RGB and applies the upstream per-channel mean/std
inside the graph, and returns all tokens after the final layer norm. Position embeddings live
at the bundle's fixed input grid: upstream ones are resampled once, at import, the way
Hugging Face DINOv2 does at run time (bicubic, ``align_corners=False``).

Bundle models (``forward(x) -> embedding, logits, cam``, see :mod:`engines.architectures`):

- :class:`ViTLinear` (``vit_linear``): CLS embedding, linear heads, maps = patch tokens x head
  weights + bias (stride = patch size);
- :class:`ViTZeroShot` (``vit_zero_shot``): projected, L2-normalized CLS embedding and
  zero-shot heads from text embeddings (:mod:`engines.zero_shot`) scored on the projected
  CLS and patch tokens.

:func:`from_hf_dinov2` and :func:`from_open_clip` map upstream state dicts onto these modules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from engines.zero_shot import ZeroShotHead


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (DINOv2 ``layer_scale``, timm ``ls``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float, layer_scale: bool, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.ls1: nn.Module = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.ls2: nn.Module = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attention = ((q * (d // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = x + self.ls1(self.proj((attention @ v).transpose(1, 2).reshape(n, t, d)))
        return x + self.ls2(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class ViT(nn.Module):
    """ViT encoder: (N, 1, H, W) grayscale in [0, 1] -> (N, 1 + h*w, dim) normalized tokens."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        image_size: Sequence[int],
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        mean: Sequence[float],
        std: Sequence[float],
        eps: float = 1e-6,
        layer_scale: bool = False,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        if image_size[0] % patch_size or image_size[1] % patch_size:
            raise ValueError(f"input size {list(image_size)} is not a multiple of the patch size {patch_size}")
        self.grid = (image_size[0] // patch_size, image_size[1] // patch_size)
        self.patch_size = patch_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.patch = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, eps, layer_scale, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def patch_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L, C) patch tokens as an (N, C, h, w) grid."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)


class ViTLinear(nn.Module):
    """ViT with linear per-finding heads on the CLS embedding; maps from the patch tokens."""

    def __init__(self, num_findings: int, **vit: object) -> None:
        super().__init__()
        self.encoder = ViT(**vit)  # type: ignore[arg-type]
        self.head = nn.Linear(self.encoder.norm.normalized_shape[0], num_findings)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.encoder(x)
        embedding = tokens[:, 0]
        return embedding, self.head(embedding), self.encoder.patch_grid(self.head(tokens[:, 1:]))


class ViTZeroShot(nn.Module):
    """CLIP-style image tower with zero-shot heads (:class:`engines.zero_shot.ZeroShotHead`).

    The image projection (no bias, as open_clip's ``visual.head.proj``) is applied to every
    token; the CLS token's gives the image embedding, the patch tokens' the maps.
    """

    def __init__(self, num_findings: int, embed_dim: int, scoring: str, logit_scale: float, **vit: object) -> None:
        super().__init__()
        self.encoder = ViT(**vit)  # type: ignore[arg-type]
        self.proj = nn.Linear(self.encoder.norm.normalized_shape[0], embed_dim, bias=False)
        self.head = ZeroShotHead(num_findings, embed_dim, scoring, logit_scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = F.normalize(self.proj(self.encoder(x)), dim=-1)
        embedding, patches = tokens[:, 0], tokens[:, 1:]
        logits, token_scores = self.head(embedding, patches)
        return embedding, logits, self.encoder.patch_grid(token_scores)


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + s*s, D) position embeddings (square source grid) resampled to ``grid``, CLS kept."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        raise ValueError(f"position embeddings for {patches.shape[1]} patches are not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    square = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    resampled = F.interpolate(square, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls, resampled.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


def from_hf_dinov2(state: Mapping[str, torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A Hugging Face ``Dinov2Model`` state dict as a :class:`ViT` state dict at ``grid``.

    Accepts keys with or without the ``dinov2.`` prefix; ``mask_token`` (training only) is dropped.
    Raises ValueError naming keys it cannot place.
    """
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    out = {
        "cls_token": state.pop("embeddings.cls_token"),
        "pos_embed": resample_pos_embed(state.pop("embeddings.position_embeddings"), grid),
        "patch.weight": state.pop("embeddings.patch_embeddings.projection.weight"),
        "patch.bias": state.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": state.pop("layernorm.weight"),
        "norm.bias": state.pop("layernorm.bias"),
    }
    state.pop("embeddings.mask_token", None)
    depth = len({k.split(".")[2] for k in state if k.startswith("encoder.layer.")})
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        attention = src + "attention.attention."
        for part in ("weight", "bias"):
            out[dst + f"qkv.{part}"] = torch.cat(
                [state.pop(f"{attention}{t}.{part}") for t in ("query", "key", "value")]
            )
            for theirs, ours in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
                out[f"{dst}{ours}.{part}"] = state.pop(f"{src}{theirs}.{part}")
            out[f"{dst}proj.{part}"] = state.pop(f"{src}attention.output.dense.{part}")
        out[dst + "ls1.gamma"] = state.pop(src + "layer_scale1.lambda1")
        out[dst + "ls2.gamma"] = state.pop(src + "layer_scale2.lambda1")
    if state:
        raise ValueError(f"DINOv2 checkpoint has keys this importer cannot place: {sorted(state)[:8]}")
    return out


#: timm ViT block module names -> :class:`Block` module names.
_TIMM = {
    "norm1": "norm1",
    "attn.qkv": "qkv",
    "attn.proj": "proj",
    "ls1": "ls1",
    "norm2": "norm2",
    "mlp.fc1": "fc1",
    "mlp.fc2": "fc2",
    "ls2": "ls2",
}


def from_open_clip(state: Mapping[str, torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The image tower of an open_clip state dict with a timm ViT trunk as :class:`ViTZeroShot` keys.

    Text-tower keys and ``logit_scale`` are ignored; unknown ``visual.`` keys raise ValueError.
    """
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    out = {
        "encoder.cls_token": visual.pop("trunk.cls_token"),
        "encoder.pos_embed": resample_pos_embed(visual.pop("trunk.pos_embed"), grid),
        "encoder.patch.weight": visual.pop("trunk.patch_embed.proj.weight"),
        "encoder.patch.bias": visual.pop("trunk.patch_embed.proj.bias"),
        "encoder.norm.weight": visual.pop("trunk.norm.weight"),
        "encoder.norm.bias": visual.pop("trunk.norm.bias"),
        "proj.weight": visual.pop("head.proj.weight"),
    }
    block = re.compile(r"trunk\.blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$")
    for key in list(visual):
        match = block.match(key)
        if match is None:
            continue
        i, name, part = match.groups()
        ours = _TIMM.get(name)
        if ours is not None:
            out[f"encoder.blocks.{i}.{ours}.{part}"] = visual.pop(key)
    if visual:
        raise ValueError(f"open_clip image tower has keys this importer cannot place: {sorted(visual)[:8]}")
    return out
