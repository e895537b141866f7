"""CLIP-family open_clip checkpoints with a timm ViT image tower (BiomedCLIP) -> zero-shot bundles.

``source`` is the downloaded model directory (``open_clip_config.json`` and
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``) or the weights file beside
its config. Only the image tower is imported: the text tower (PubMedBERT for BiomedCLIP) is not
run at inference, so the operator supplies the prompts' text embeddings, computed once with it,
in ``prompts`` (JSON)::

    {"scoring": "clip" | "elixr",                       # optional, default "clip"
     "findings": [{"name": "Effusion",
                   "code": {"value": "60046008", "scheme": "SCT", "meaning": "Pleural effusion"},
                   "threshold": 0.5,
                   "positive": [...floats...] or [[...], ...],   # one or several prompts
                   "negative": [...],
                   "positive_text": ["pleural effusion"],          # optional, recorded
                   "negative_text": ["no pleural effusion"]}]}

- embedding: the projected, L2-normalized image embedding (open_clip ``encode_image``,
  normalized): the CLS token after the trunk's final norm through ``visual.head.proj``;
- probabilities and maps: :mod:`engines.zero_shot` with the checkpoint's ``exp(logit_scale)``;
  maps project every patch token the same way (an approximation: CLIP trains only the CLS);
- preprocessing as in :mod:`engines.importers.dinov2` (letterbox; mean/std in the graph).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.architectures import build
from engines.importers.dinov2 import read_state_dict, vit_manifest
from engines.importers.writer import write_bundle
from engines.nets.vit import from_open_clip
from engines.zero_shot import SCORINGS, prompt_embedding

#: OpenAI CLIP statistics, open_clip's default when the config names none.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: Attention heads of timm ViT sizes (not recoverable from weight shapes).
TIMM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}


def import_bundle(
    source: Path,
    out: Path,
    *,
    name: str,
    version: str,
    progress: Callable[[str], None] | None = None,
    prompts: Path | str | None = None,
    scoring: str | None = None,
    licence: str | None = None,
    description: str | None = None,
) -> Path:
    """Write the image tower at ``source`` with zero-shot heads from ``prompts`` as a bundle in ``out``."""
    say = progress or (lambda _message: None)
    directory = source if source.is_dir() else source.parent
    config_path = directory / "open_clip_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: missing; download it with the weights")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if prompts is None:
        raise ValueError("a bundle needs at least one finding: pass prompts=PATH.json with text embeddings")
    weights = (
        source if source.is_file() else next((directory / f for f in WEIGHT_FILES if (directory / f).is_file()), None)
    )
    if weights is None:
        raise FileNotFoundError(f"{directory}: none of {', '.join(WEIGHT_FILES)}")
    model_cfg = config.get("model_cfg", config)
    vision = model_cfg["vision_cfg"]
    timm_name = str(vision.get("timm_model_name", ""))
    if not timm_name.startswith("vit_"):
        raise ValueError(f"{config_path}: vision tower {timm_name or 'non-timm'!r}; only timm ViT towers are supported")
    if vision.get("timm_pool", "") not in ("", "token") or vision.get("timm_proj", "linear") != "linear":
        raise ValueError(f"{config_path}: only CLS-token pooling with a linear projection is supported")
    size_key = timm_name.split("_")[1]
    if size_key not in TIMM_HEADS:
        raise ValueError(f"{config_path}: unknown timm ViT size {size_key!r}; known: {', '.join(TIMM_HEADS)}")
    say(f"reading {weights}")
    state = read_state_dict(weights)
    dim = int(state["visual.trunk.cls_token"].shape[-1])
    patch = int(state["visual.trunk.patch_embed.proj.weight"].shape[-1])
    image_size = vision.get("image_size", 224)
    size = [image_size, image_size] if isinstance(image_size, int) else [int(v) for v in image_size]
    embed_dim = int(model_cfg["embed_dim"])
    spec = json.loads(Path(prompts).read_text(encoding="utf-8"))
    scoring = scoring or spec.get("scoring", "clip")
    if scoring not in SCORINGS:
        raise ValueError(f"zero-shot scoring {scoring!r}: expected one of {', '.join(SCORINGS)}")
    preprocess = config.get("preprocess_cfg", {})
    architecture = {
        "name": "vit_zero_shot",
        "embed_dim": embed_dim,
        "scoring": scoring,
        "logit_scale": math.exp(float(state["logit_scale"])) if "logit_scale" in state else 100.0,
        "image_size": size,
        "patch_size": patch,
        "dim": dim,
        "depth": len({k.split(".")[3] for k in state if k.startswith("visual.trunk.blocks.")}),
        "heads": TIMM_HEADS[size_key],
        "mlp_dim": int(state["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0]),
        "mean": [float(v) for v in preprocess.get("mean", CLIP_MEAN)],
        "std": [float(v) for v in preprocess.get("std", CLIP_STD)],
        "eps": 1e-6,
        "layer_scale": "visual.trunk.blocks.0.ls1.gamma" in state,
        "qkv_bias": "visual.trunk.blocks.0.attn.qkv.bias" in state,
    }
    findings, positive, negative = read_prompts(spec, embed_dim, Path(prompts))
    model = build(architecture, num_findings=len(findings))
    model.load_state_dict(
        {
            **from_open_clip(state, (size[0] // patch, size[1] // patch)),
            "head.positive": positive,
            "head.negative": negative,
        }
    )
    manifest = vit_manifest(
        name=name,
        version=version,
        description=description
        or f"CLIP-family image tower imported from {directory.name} ({embed_dim}-d joint embedding) "
        f"with {scoring} zero-shot heads from precomputed prompt embeddings.",
        licence=licence or "as the upstream model's licence states (not recorded at import); check before use",
        source={"imported_from": str(directory), "importer": "open_clip", "prompts": str(prompts)},
        architecture=architecture,
        findings=findings,
        upstream_preprocessing=preprocess,
        probabilities=f"zero-shot {scoring} scoring, positive vs negative prompt (engines.zero_shot)",
        map_method="patch-token cosine similarity, positive minus negative prompt, times the logit scale",
        embedding_dim=embed_dim,
    )
    return write_bundle(out, model=model, manifest=manifest, progress=say)


def read_prompts(spec: dict[str, Any], dim: int, path: Path) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor]:
    """Manifest findings (with prompt texts) and (F, dim) unit positive/negative embeddings (torch)."""
    items = spec.get("findings")
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: 'findings' must be a non-empty list")
    findings, positive, negative = [], [], []
    for i, item in enumerate(items):
        try:
            positive.append(prompt_embedding(item["positive"], dim))
            negative.append(prompt_embedding(item["negative"], dim))
            finding = {"name": item["name"], "code": item["code"], "threshold": float(item.get("threshold", 0.5))}
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: findings[{i}]: {exc}") from exc
        finding["prompts"] = {side: item.get(f"{side}_text") for side in ("positive", "negative")}
        findings.append(finding)
    return findings, torch.from_numpy(np.stack(positive)), torch.from_numpy(np.stack(negative))
