"""DINOv2-family Hugging Face checkpoints (RAD-DINO, facebook/dinov2-*) -> Pleura bundles.

``source`` is the downloaded model directory (``config.json``, ``model.safetensors``, and
``preprocessor_config.json`` if present) or the ``.safetensors`` file beside its config.

- embedding: the CLS token after the final layer norm (Hugging Face ``pooler_output``);
- findings: a bundle must name at least one, so the operator passes ``heads`` (an ``.npz``
  with ``names``, ``weights`` (F, D), ``bias`` (F,), ``thresholds`` (F,), ``code_values``,
  ``code_schemes``, ``code_meanings``), e.g. from a head trained on stored embeddings;
  probability = sigmoid(weights . CLS + bias);
- maps: each patch token (after the final layer norm) times the head weights plus bias,
  stride = patch size;
- preprocessing: the grayscale image is letterboxed (Pleura's one geometry policy) into the
  upstream crop size, replicated to RGB and normalized with the upstream per-channel
  mean/std inside the graph. The upstream resize-shortest-edge + centre-crop is recorded in
  the manifest; for square images the two agree up to the resampling filter.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.importers.writer import ADULT_FRONTAL_CHEST, write_bundle
from engines.nets.vit import ViTLinear, from_hf_dinov2

#: ImageNet statistics, the Hugging Face default for DINOv2 image processors.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TOLERANCE = {
    "fp32": {"embeddings": 1e-3, "probabilities": 1e-3, "maps": 1e-3},
    "fp16": {"embeddings": 0.05, "probabilities": 0.05, "maps": 0.05},
}


def import_bundle(
    source: Path,
    out: Path,
    *,
    name: str,
    version: str,
    progress: Callable[[str], None] | None = None,
    heads: Path | str | None = None,
    licence: str | None = None,
    description: str | None = None,
) -> Path:
    """Write the DINOv2 checkpoint at ``source`` with the linear ``heads`` as a bundle in ``out``."""
    say = progress or (lambda _message: None)
    directory = source if source.is_dir() else source.parent
    weights = source if source.is_file() else directory / "model.safetensors"
    config = _read_json(directory / "config.json")
    _check_config(config, directory / "config.json")
    if heads is None:
        raise ValueError(
            "a bundle needs at least one finding: pass heads=PATH.npz (names, weights, bias, thresholds, "
            "code_values, code_schemes, code_meanings) with weights over the CLS embedding"
        )
    processor_path = directory / "preprocessor_config.json"
    processor = _read_json(processor_path) if processor_path.is_file() else {}
    size = input_size(processor, config)
    patch = int(config.get("patch_size", 14))
    dim = int(config.get("hidden_size", 768))
    architecture = {
        "name": "vit_linear",
        "image_size": list(size),
        "patch_size": patch,
        "dim": dim,
        "depth": int(config.get("num_hidden_layers", 12)),
        "heads": int(config.get("num_attention_heads", 12)),
        "mlp_dim": int(dim * config.get("mlp_ratio", 4)),
        "mean": [float(v) for v in processor.get("image_mean", IMAGENET_MEAN)],
        "std": [float(v) for v in processor.get("image_std", IMAGENET_STD)],
        "eps": float(config.get("layer_norm_eps", 1e-6)),
        "layer_scale": True,
        "qkv_bias": bool(config.get("qkv_bias", True)),
    }
    findings, head_weight, head_bias = read_heads(Path(heads), dim)
    say(f"reading {weights}")
    state = from_hf_dinov2(read_state_dict(weights), (size[0] // patch, size[1] // patch))
    model = ViTLinear(len(findings), **{k: v for k, v in architecture.items() if k != "name"})
    model.encoder.load_state_dict(state)
    model.head.weight.data.copy_(torch.from_numpy(head_weight))
    model.head.bias.data.copy_(torch.from_numpy(head_bias))
    manifest = vit_manifest(
        name=name,
        version=version,
        description=description
        or f"DINOv2-family encoder imported from {directory.name} ({dim}-d CLS embedding) with linear heads.",
        licence=licence or "as the upstream model's licence states (not recorded at import); check before use",
        source={"imported_from": str(directory), "importer": "dinov2", "heads": str(heads)},
        architecture=architecture,
        findings=findings,
        upstream_preprocessing=processor,
        probabilities="sigmoid of one linear head per finding on the CLS embedding",
        map_method="patch tokens x head weights + bias",
    )
    return write_bundle(out, model=model, manifest=manifest, progress=say)


def input_size(processor: Mapping[str, Any], config: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) the upstream processor feeds the model: its crop size, else its resize size."""
    for key in ("crop_size", "size") if processor.get("do_center_crop", True) else ("size",):
        spec = processor.get(key)
        if isinstance(spec, int):
            return spec, spec
        if isinstance(spec, Mapping):
            if "height" in spec and "width" in spec:
                return int(spec["height"]), int(spec["width"])
            if "shortest_edge" in spec:
                return int(spec["shortest_edge"]), int(spec["shortest_edge"])
    side = int(config.get("image_size", 224))
    return side, side


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch pickle (``.bin``/``.pt``) loaded weights-only."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415 (optional dependency)

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def read_heads(path: Path, dim: int) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray]:
    """Manifest findings, (F, dim) weights and (F,) bias from a heads ``.npz``."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    keys = ("names", "weights", "bias", "thresholds", "code_values", "code_schemes", "code_meanings")
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"{path}: heads file lacks {', '.join(missing)}")
    weight = arrays["weights"].astype(np.float32)
    n = len(arrays["names"])
    if weight.shape != (n, dim) or arrays["bias"].shape != (n,) or n == 0:
        raise ValueError(f"{path}: expected weights ({n}, {dim}) and bias ({n},) for {n} findings")
    findings = [
        {
            "name": str(arrays["names"][i]),
            "code": {
                "value": str(arrays["code_values"][i]),
                "scheme": str(arrays["code_schemes"][i]),
                "meaning": str(arrays["code_meanings"][i]),
            },
            "threshold": float(arrays["thresholds"][i]),
        }
        for i in range(n)
    ]
    return findings, weight, arrays["bias"].astype(np.float32)


def vit_manifest(
    *,
    name: str,
    version: str,
    description: str,
    licence: str,
    source: dict[str, Any],
    architecture: dict[str, Any],
    findings: Sequence[dict[str, Any]],
    upstream_preprocessing: Mapping[str, Any],
    probabilities: str,
    map_method: str,
    embedding_dim: int | None = None,
) -> dict[str, Any]:
    """A bundle manifest (all but ``files``) for an imported ViT (:mod:`engines.nets.vit`)."""
    size = architecture["image_size"]
    patch = architecture["patch_size"]
    return {
        "schema_version": 1,
        "name": name,
        "version": version,
        "description": description,
        "licence": licence,
        "source": source,
        "intended_use": dict(ADULT_FRONTAL_CHEST),
        "input": {
            "size": list(size),
            "channels": 1,
            "photometric_interpretation": "MONOCHROME2",
            "pixel_range": [0.0, 1.0],
            "resize": {
                "policy": "letterbox",
                "pad_value": 0.0,
                "upstream": dict(upstream_preprocessing),
                "description": "Letterboxed into input.size; the upstream resize + centre crop is not reproduced.",
            },
            "normalization": {
                "scheme": "range",
                "low": 0.0,
                "high": 1.0,
                "description": "Identity here: the graph replicates the channel to RGB and applies the "
                f"upstream mean {architecture['mean']} / std {architecture['std']} itself.",
            },
        },
        "architecture": architecture,
        "outputs": {
            "embedding_dim": embedding_dim or architecture["dim"],
            "probabilities": probabilities,
            "map": {
                "method": map_method,
                "feature_stride": patch,
                "size": [size[0] // patch, size[1] // patch],
            },
        },
        "findings": list(findings),
        "parity": {"tolerance": TOLERANCE},
    }


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; download the model's config files with its weights")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_config(config: Mapping[str, Any], path: Path) -> None:
    if config.get("model_type", "dinov2") != "dinov2":
        raise ValueError(f"{path}: model_type is {config['model_type']!r}, not 'dinov2'")
    if config.get("use_swiglu_ffn") or config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: only the GELU MLP variant is supported (not SwiGLU: dinov2-giant)")
