"""A new version of a language-aligned bundle with one more zero-shot finding, from text prompts.

The bundle's text side (:mod:`engines.text`) embeds the positive and negative prompts; their
mean unit embeddings become one more row of the ``vit_zero_shot`` head (or replace the row of
a finding of the same name), scored as the bundle's architecture declares (``clip`` softmax or
``elixr`` max over patch tokens, :mod:`engines.zero_shot`). The image tower's weights and the
text projection are copied unchanged; the new bundle is exported and parity-gated like any.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from engines.architectures import build
from engines.bundle import Bundle, BundleError
from engines.importers.writer import write_bundle
from engines.parity import golden
from engines.text import PROJECTION, text_encoder
from engines.zero_shot import prompt_embedding


def add_finding(bundle: Bundle, out: Path, *, finding: dict[str, Any], positive: Sequence[str],
                negative: Sequence[str], version: str, progress: Callable[[str], None] | None = None) -> Path:
    """Write ``bundle`` as ``version`` in ``out`` with ``finding`` (name, code, threshold) prompted.

    Raises :class:`engines.text.NoTextEncoder` for a bundle without a text side and
    :class:`BundleError` for one whose image side is not a ``vit_zero_shot`` tower.
    """
    architecture = bundle.manifest["architecture"]
    if architecture["name"] != "vit_zero_shot":
        raise BundleError(f"bundle {bundle.name} {bundle.version} is a {architecture['name']} model: zero-shot "
                          "findings need a language-aligned vit_zero_shot image tower")
    if bundle.manifest.get("heads"):
        raise BundleError(f"bundle {bundle.name} {bundle.version} carries trained heads, which are bound to its "
                          "encoder; add zero-shot findings to the version they were trained on first")
    encoder = text_encoder(bundle)
    dim = bundle.manifest["outputs"]["embedding_dim"]
    rows = {side: torch.from_numpy(prompt_embedding(encoder.encode(list(texts)), dim))
            for side, texts in (("positive", positive), ("negative", negative))}
    findings = copy.deepcopy(bundle.manifest["findings"])
    names = [f["name"] for f in findings]
    row = names.index(finding["name"]) if finding["name"] in names else len(findings)
    findings[row:row + 1] = [{**finding, "prompts": {"positive": list(positive), "negative": list(negative)}}]
    state = torch.load(bundle.file("torch_state_dict"), map_location="cpu", weights_only=True)
    for side, vector in rows.items():
        table = state[f"head.{side}"]
        state[f"head.{side}"] = torch.cat([table[:row], vector[None], table[row + 1:]])
    model = build(architecture, len(findings))
    model.load_state_dict(state)
    manifest = copy.deepcopy(bundle.manifest)
    manifest.update(version=version, findings=findings, derived_from={
        "name": bundle.name, "version": bundle.version, "model_sha256": bundle.model_sha256,
        "zero_shot_finding": finding["name"]})
    manifest["notes"] = [*manifest.get("notes", []), (
        f"{finding['name']}: zero-shot ({architecture['scoring']} scoring) from prompts, "
        f"positive {list(positive)}, negative {list(negative)}; not validated on labelled images here")]
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle.file(PROJECTION), out / manifest["files"][PROJECTION])
    inputs, _ = golden(bundle)
    return write_bundle(out, model=model, manifest=manifest, golden_inputs=inputs, progress=progress)
