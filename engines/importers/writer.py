"""Write a model bundle from a torch module: ONNX, state dict, golden outputs, manifest, model card.

The module's ``forward(x)`` returns ``(embedding, logits, cam)`` (see :mod:`engines.architectures`)
and must be what ``engines.architectures.build(manifest["architecture"], len(findings))`` builds,
so the torch backend can reload its state dict. The golden reference outputs are computed by
the engines inference path itself (preprocessing, torch backend on the CPU in fp32, maps), and
the ONNX graph is checked against them before :func:`write_bundle` returns.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engines.backends.base import OUTPUT_NAMES
from engines.backends.ort import INPUT_NAME
from engines.backends.pytorch import TorchBackend
from engines.bundle import MANIFEST, load_bundle
from engines.pins import pin
from engines.preprocess import resize
from engines.runtime import Engine, load

#: File names every written bundle uses, by manifest ``files`` role.
FILES = {
    "onnx": "encoder.onnx",
    "torch_state_dict": "weights.pt",
    "golden": "golden.npz",
    "model_card": "MODEL_CARD.md",
}
ONNX_OPSET = 17

Progress = Callable[[str], None]


#: Intended use of a chest radiograph model unless its importer is told otherwise.
ADULT_FRONTAL_CHEST = {"modalities": ["CR", "DX"], "body_parts": ["CHEST"], "views": ["PA", "AP"], "min_age_years": 18}


def synthetic_inputs(seed: int = 0) -> list[np.ndarray]:
    """Three non-patient images in [0, 1] of varied sizes and aspects, for golden outputs.

    A smooth random field (97x211), uniform noise (64x64) and a vertical gradient with a bright
    disc (300x120); seeded, so a rebuild gives the same arrays.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:300, 0:120]
    disc = ((rows - 180) ** 2 + (cols - 50) ** 2 < 30**2) * 0.5
    images = [
        resize(rng.random((12, 26), dtype=np.float32), 97, 211),
        rng.random((64, 64), dtype=np.float32),
        rows / 299.0 * 0.5 + disc,
    ]
    return [np.clip(im, 0.0, 1.0).astype(np.float32) for im in images]


def export_onnx(model: torch.nn.Module, path: Path, size: Sequence[int]) -> None:
    """Export ``model`` (eval mode) to ONNX: input ``image`` (N, 1, H, W), the three outputs, dynamic N."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, *size),),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
        )


def write_manifest(out: Path, manifest: dict[str, Any], model_card: str | None = None) -> dict[str, Any]:
    """Write ``manifest`` with its ``files`` filled in and the model card, then pin every file
    of ``out`` (:func:`engines.pins.pin`).

    ``model_card`` is the card's Markdown; by default a minimal card is drawn from the manifest.
    Returns the manifest as written.
    """
    manifest = {key: value for key, value in manifest.items() if key not in ("sha256", "pins")}
    manifest["files"] = {**manifest.get("files", {}), **FILES}
    (out / FILES["model_card"]).write_text(model_card if model_card is not None else minimal_card(manifest))
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {**manifest, "pins": pin(out)}


def write_bundle(
    out: Path,
    *,
    model: torch.nn.Module,
    manifest: dict[str, Any],
    golden_inputs: list[np.ndarray] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write ``model`` as a bundle in ``out`` and return ``out``.

    ``manifest`` is complete but for ``files`` and ``pins``, which are filled in. Golden inputs
    default to :func:`synthetic_inputs`. Raises :class:`engines.ParityError` if the exported
    ONNX graph does not reproduce the reference outputs within the manifest's tolerance.
    """
    say = progress or (lambda _message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    torch.save(model.state_dict(), out / FILES["torch_state_dict"])
    say(f"exporting ONNX (opset {ONNX_OPSET}) to {out / FILES['onnx']}")
    export_onnx(model, out / FILES["onnx"], manifest["input"]["size"])
    inputs = golden_inputs if golden_inputs is not None else synthetic_inputs()
    named: dict[str, Any] = {f"input_{i}": np.asarray(g, np.float32) for i, g in enumerate(inputs)}
    np.savez_compressed(out / FILES["golden"], **named)
    write_manifest(out, manifest)
    say(f"computing reference outputs on {len(inputs)} golden inputs (torch, CPU, fp32)")
    bundle = load_bundle(out)
    reference = Engine(bundle, TorchBackend(bundle, device="cpu")).infer(list(named.values()))
    np.savez_compressed(
        out / FILES["golden"],
        **named,
        embeddings=reference.embeddings,
        probabilities=reference.probabilities,
        maps=reference.maps,
    )
    write_manifest(out, manifest)
    engine = load(out, backend="onnxruntime")
    say(f"{engine.backend} passes the parity gate ({engine.parity.describe() if engine.parity else ''})")
    return out


def minimal_card(manifest: dict[str, Any]) -> str:
    """A short Markdown model card drawn from the manifest: what, source, licence, intended use."""
    use = manifest["intended_use"]
    source = manifest.get("source", {})
    lines = [
        f"# {manifest['name']} {manifest['version']}",
        "",
        manifest["description"],
        "",
        "## Source and licence",
        "",
        *(f"- {key.replace('_', ' ')}: {value}" for key, value in source.items()),
        f"- licence: {manifest['licence']}",
        "",
        "## Intended use",
        "",
        f"- modalities: {', '.join(use['modalities'])}; body parts: {', '.join(use['body_parts'])}; "
        f"views: {', '.join(use['views'])}; minimum age: {use['min_age_years']} years",
        f"- input: {manifest['input']['size'][0]}x{manifest['input']['size'][1]}, "
        f"resize policy {manifest['input']['resize']['policy']!r}, "
        f"normalization {json.dumps(manifest['input']['normalization'])}",
        f"- outputs: {manifest['outputs']['embedding_dim']}-d embedding, one probability and one "
        "localization map per finding",
        "",
        "## Findings",
        "",
        "| Finding | Code | Operating threshold |",
        "|---|---|---|",
        *(
            f"| {f['name']} | {f['code']['scheme']} {f['code']['value']} '{f['code']['meaning']}' "
            f"| {f['threshold']:.4g} |"
            for f in manifest["findings"]
        ),
        "",
    ]
    notes = manifest.get("notes", [])
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    lines += [
        "## Validation",
        "",
        "**Not validated here.** Pleura checked only that its backends reproduce this model's own "
        "outputs (the parity gate on golden.npz, synthetic non-patient inputs). Its diagnostic "
        "performance on your patients, scanners and population is unknown until measured locally; "
        "it is not a medical device.",
        "",
    ]
    return "\n".join(lines)
