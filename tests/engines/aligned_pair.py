"""A tiny language-aligned image/text pair, built for tests.

No language-aligned chest X-ray encoder can be downloaded here. The image side is a ViT with no
blocks whose patch tokens are ``+U`` where a 8x8 patch is brighter than 0.5 and ``-U`` elsewhere
(so a bright spot has a known direction in a 4-d joint space). The text side is the real
all-MiniLM-L6-v2 sentence encoder with a 4x384 projection fitted by least squares so that a few
anchor sentences about a bright spot land on ``U`` and a few about an empty image on
``NEGATIVE``; sentences that are not anchors must then fall on the right side by the sentence
encoder's own sense of meaning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.importers.dinov2 import vit_manifest
from engines.importers.writer import write_bundle
from engines.nets.vit import ViTZeroShot
from engines.text import MINILM, TOWERS

U = np.array([1.0, -1.0, 0.0, 0.0]) / np.sqrt(2)  # bright patch direction; background is -U
NEGATIVE = np.array([-1.0, 1.0, 1.0, -1.0]) / 2  # cos 0.71 with background, -0.71 with the feature
SCALE = 10.0
POSITIVE_ANCHORS = ["a bright spot", "a bright nodule", "a dense white opacity", "a bright round lesion in the lung"]
NEGATIVE_ANCHORS = ["a uniform dark background", "nothing abnormal", "an empty normal image",
                    "clear lungs with no lesion"]
NODULE = {"name": "Nodule", "code": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}, "threshold": 0.5}


def architecture(scoring: str = "elixr") -> dict:
    return {
        "name": "vit_zero_shot", "embed_dim": 4, "scoring": scoring, "logit_scale": SCALE, "image_size": [32, 32],
        "patch_size": 8, "dim": 4, "depth": 0, "heads": 1, "mlp_dim": 4, "mean": [0.5] * 3, "std": [1.0] * 3,
    }  # fmt: skip


def planted_model(scoring: str = "elixr") -> ViTZeroShot:
    """Patch tokens +U (bright patch) or -U; one finding (Nodule) prompted with U against NEGATIVE."""
    spec = {k: v for k, v in architecture(scoring).items() if k != "name"}
    model = ViTZeroShot(1, **spec)
    with torch.no_grad():
        model.encoder.patch.weight.zero_()
        model.encoder.patch.weight[0] = 1 / (3 * 64)  # channel 0: patch mean minus 0.5
        model.encoder.patch.weight[1] = -1 / (3 * 64)
        model.encoder.patch.bias.zero_()
        model.encoder.cls_token.copy_(torch.tensor([0.0, 0.0, 1.0, -1.0]))
        model.proj.weight.copy_(torch.eye(4))
        model.head.positive.copy_(torch.tensor(U[None], dtype=torch.float32))
        model.head.negative.copy_(torch.tensor(NEGATIVE[None], dtype=torch.float32))
    return model


def images() -> tuple[np.ndarray, np.ndarray]:
    """A 32x32 image with a bright 8x8 spot at patch (1, 2), and the same background without it."""
    background = np.full((32, 32), 0.2, np.float32)
    spot = background.copy()
    spot[8:16, 16:24] = 0.9
    return spot, background


def fitted_projection() -> np.ndarray:
    """(4, 384) float32: the anchors' MiniLM embeddings mapped to U and NEGATIVE (least squares)."""
    _, load_tower = TOWERS[MINILM]
    x = load_tower()(POSITIVE_ANCHORS + NEGATIVE_ANCHORS)
    y = np.array([U] * len(POSITIVE_ANCHORS) + [NEGATIVE] * len(NEGATIVE_ANCHORS))
    solution, *_ = np.linalg.lstsq(x, y, rcond=None)
    return solution.T.astype(np.float32)


def write_aligned_bundle(out: Path, scoring: str = "elixr", name: str = "planted", version: str = "1") -> Path:
    """The planted image tower with the fitted MiniLM text side, written and parity-gated as a bundle."""
    manifest = vit_manifest(
        name=name, version=version, description="hand-built language-aligned test model", licence="test only",
        source={}, architecture=architecture(scoring), findings=[NODULE], upstream_preprocessing={},
        probabilities=scoring, map_method="patch-token similarity",
    )  # fmt: skip
    manifest["text_encoder"] = {"kind": MINILM}
    manifest["files"] = {"text_projection": "text_projection.npy"}
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "text_projection.npy", fitted_projection())
    return write_bundle(out, model=planted_model(scoring), manifest=manifest, golden_inputs=list(images()))
