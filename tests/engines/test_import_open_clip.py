"""open_clip importer: a tiny random-weight BiomedCLIP-style checkpoint in upstream format.

The checkpoint is an open_clip state dict (timm ViT trunk under ``visual.trunk.``, projection
``visual.head.proj``, a stand-in text tower, ``logit_scale``) saved as
``open_clip_pytorch_model.bin`` beside ``open_clip_config.json``. open_clip_torch itself
cannot be installed here (it requires torchvision, which would replace the pinned torch), so
the bundle is compared with the straightforward reference ViT written below, which reads the
timm key names directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from engines import load
from engines.importers import import_model

DIM, DEPTH, HEADS, PATCH, SIZE, EMBED = 48, 2, 3, 16, 64, 32
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def random_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm ``vit_tiny``-shaped open_clip state dict (few layers, small input) with random weights."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1, offset: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + offset

    tokens = 1 + (SIZE // PATCH) ** 2
    state = {
        "visual.trunk.cls_token": rand(1, 1, DIM),
        "visual.trunk.pos_embed": rand(1, tokens, DIM),
        "visual.trunk.patch_embed.proj.weight": rand(DIM, 3, PATCH, PATCH, scale=0.05),
        "visual.trunk.patch_embed.proj.bias": rand(DIM),
        "visual.trunk.norm.weight": rand(DIM, offset=1.0),
        "visual.trunk.norm.bias": rand(DIM),
        "visual.head.proj.weight": rand(EMBED, DIM),
        "text.transformer.embeddings.word_embeddings.weight": rand(10, 8),
        "text.proj.0.weight": rand(EMBED, 8),
        "logit_scale": torch.tensor(math.log(50.0)),
    }
    for i in range(DEPTH):
        b = f"visual.trunk.blocks.{i}."
        for norm in ("norm1", "norm2"):
            state[b + norm + ".weight"], state[b + norm + ".bias"] = rand(DIM, offset=1.0), rand(DIM)
        for name, (n_out, n_in) in {
            "attn.qkv": (3 * DIM, DIM),
            "attn.proj": (DIM, DIM),
            "mlp.fc1": (4 * DIM, DIM),
            "mlp.fc2": (DIM, 4 * DIM),
        }.items():
            state[b + name + ".weight"], state[b + name + ".bias"] = rand(n_out, n_in), rand(n_out)
    return state


def reference_tokens(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """Projected, unnormalized tokens of a timm ViT + open_clip linear head, written plainly."""
    s = {k.removeprefix("visual."): v for k, v in state.items()}
    x = F.conv2d(pixels, s["trunk.patch_embed.proj.weight"], s["trunk.patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([s["trunk.cls_token"], x.flatten(2).transpose(1, 2)], dim=1) + s["trunk.pos_embed"]
    head_dim = DIM // HEADS
    for i in range(DEPTH):
        b = f"trunk.blocks.{i}."
        h = F.layer_norm(x, (DIM,), s[b + "norm1.weight"], s[b + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"]).chunk(3, dim=-1)
        heads = []
        for j in range(HEADS):
            part = slice(j * head_dim, (j + 1) * head_dim)
            weights = torch.softmax(q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(head_dim), dim=-1)
            heads.append(weights @ v[..., part])
        x = x + F.linear(torch.cat(heads, dim=-1), s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        h = F.layer_norm(x, (DIM,), s[b + "norm2.weight"], s[b + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, s[b + "mlp.fc1.weight"], s[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, s[b + "mlp.fc2.weight"], s[b + "mlp.fc2.bias"])
    x = F.layer_norm(x, (DIM,), s["trunk.norm.weight"], s["trunk.norm.bias"], eps=1e-6)
    return x @ s["head.proj.weight"].T


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict]:
    directory = tmp_path_factory.mktemp("biomedclip-tiny")
    state = random_state()
    torch.save(state, directory / "open_clip_pytorch_model.bin")
    config = {
        "model_cfg": {
            "embed_dim": EMBED,
            "vision_cfg": {
                "timm_model_name": "vit_tiny_patch16_224",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": SIZE,
            },
            "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", "proj": "mlp"},
        },
        "preprocess_cfg": {"mean": MEAN, "std": STD},
    }
    (directory / "open_clip_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    prompts = {
        "findings": [
            {
                "name": "Effusion",
                "code": {"value": "60046008", "scheme": "SCT", "meaning": "Pleural effusion"},
                "threshold": 0.5,
                "positive": rng.normal(size=(2, EMBED)).tolist(),
                "negative": rng.normal(size=EMBED).tolist(),
                "positive_text": ["pleural effusion", "fluid in the pleural space"],
                "negative_text": ["no pleural effusion"],
            }
        ]
    }
    (directory / "prompts.json").write_text(json.dumps(prompts))
    return directory, state, prompts


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.mark.parametrize("scoring", ["clip", "elixr"])
def test_imported_bundle_matches_reference(
    checkpoint: tuple[Path, dict[str, torch.Tensor], dict], tmp_path: Path, scoring: str
) -> None:
    directory, state, prompts = checkpoint
    out = import_model(
        "open_clip", directory, tmp_path / "b", name="biomedclip-tiny", version="1",
        prompts=directory / "prompts.json", scoring=scoring,
    )  # fmt: skip
    image = np.random.default_rng(2).random((SIZE, SIZE), dtype=np.float32)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    pixels = (torch.from_numpy(image).expand(1, 3, SIZE, SIZE) - mean) / std
    tokens = _unit(reference_tokens(state, pixels)[0].numpy().astype(np.float64))
    finding = prompts["findings"][0]
    positive = _unit(_unit(np.array(finding["positive"])).mean(axis=0))
    negative = _unit(np.array(finding["negative"]))
    if scoring == "clip":  # softmax over [pos, neg] of logit_scale * cosine
        pair = 50.0 * np.array([tokens[0] @ positive, tokens[0] @ negative])
        expected = np.exp(pair[0]) / np.exp(pair).sum()
    else:  # max over patch tokens of cosine, positive minus negative
        expected = 1 / (1 + np.exp(-50.0 * ((tokens[1:] @ positive).max() - (tokens[1:] @ negative).max())))
    expected_maps = 1 / (1 + np.exp(-50.0 * (tokens[1:] @ positive - tokens[1:] @ negative)))
    for backend in ("onnxruntime", "torch"):
        engine = load(out, backend)
        assert engine.parity is not None and engine.parity.passed
        result = engine.infer([image])
        np.testing.assert_allclose(result.embeddings[0], tokens[0], atol=1e-4)
        np.testing.assert_allclose(result.probabilities[0, 0], expected, atol=1e-4)
        np.testing.assert_allclose(result.maps[0, 0], expected_maps.reshape(SIZE // PATCH, -1), atol=1e-4)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"]["scoring"] == scoring
    assert manifest["findings"][0]["prompts"]["negative"] == ["no pleural effusion"]


def test_prompts_must_match_the_embedding_size(
    checkpoint: tuple[Path, dict[str, torch.Tensor], dict], tmp_path: Path
) -> None:
    directory, _, prompts = checkpoint
    bad = {"findings": [{**prompts["findings"][0], "negative": [1.0, 2.0]}]}
    (tmp_path / "p.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"findings\[0\].*length 32"):
        import_model("open_clip", directory, tmp_path / "b", name="x", version="1", prompts=tmp_path / "p.json")
