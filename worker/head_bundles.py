"""Installing a trained head as a new version of the bundle whose embeddings it reads."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from worker.settings import Settings


def slug(name: str) -> str:
    """``name`` made safe as a file or folder name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "finding"


def write_bundle(settings: Settings, bundle: Any, finding: str, doc: dict[str, Any], version: str | None,
                 code: str | None) -> Path:
    """Install a copy of ``bundle`` with the head ``doc`` as a new version; returns its directory.

    The encoder files are copied byte for byte. The head is reported as ``finding``, or as
    ``"FINDING (head)"`` when the encoder already reports ``finding`` (its code is reused), with
    ``code`` (``VALUE,SCHEME,MEANING``) required for a finding the bundle does not know. A head of
    the same name from an earlier version is replaced. The version defaults to
    ``<base version>+head.<finding>.<n>``, the first n not installed. ``golden.npz`` keeps the
    encoder's reference inputs, embeddings and maps; its probabilities gain one column per head,
    computed from the reference embeddings, so the parity gate checks the heads too.
    """
    import shutil

    from engines import load_bundle
    from engines.bundle import MANIFEST
    from engines.heads.serving import apply_heads, served_heads

    known = {f.name: f for f in bundle.findings}
    name = f"{finding} (head)" if finding in known else finding
    if code:
        parts = [p.strip() for p in code.split(",", 2)]
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"--code must be VALUE,SCHEME,MEANING, got {code!r}")
        coded = dict(zip(("value", "scheme", "meaning"), parts, strict=True))
    elif finding in known:
        spec = known[finding]
        coded = {"value": spec.code_value, "scheme": spec.code_scheme, "meaning": spec.code_meaning}
    else:
        raise ValueError(f"{finding!r} is not a finding of {bundle.name}; give its SR code with "
                         "--code VALUE,SCHEME,MEANING (e.g. a SNOMED CT concept, scheme SCT)")
    root = settings.effective_models_dir
    base = bundle.version.split("+")[0]
    n = 1
    while version is None and (root / slug(f"{bundle.name}-{base}+head.{slug(finding)}.{n}")).exists():
        n += 1
    version = version or f"{base}+head.{slug(finding)}.{n}"
    target = root / slug(f"{bundle.name}-{version}")
    if target.exists():
        raise ValueError(f"{target} exists: choose another --version")
    manifest = json.loads(json.dumps(bundle.manifest))
    heads = [h for h in manifest.get("heads", []) if h["name"] != name] + [{"name": name, "code": coded, "head": doc}]
    manifest.update(version=version, heads=heads, derived_from={
        "name": bundle.name, "version": bundle.version, "model_sha256": bundle.model_sha256,
        "encoder_sha256": bundle.encoder_sha256, "added_head": name})
    from engines.parity import golden

    inputs, reference = golden(bundle)
    encoder = len(bundle.findings)
    reference["probabilities"] = np.concatenate(
        [reference["probabilities"][:, :encoder], apply_heads(served_heads(heads), reference["embeddings"])], axis=1)
    staging = root / f".{target.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(bundle.path, staging)
    np.savez(staging / manifest["files"]["golden"], **{f"input_{i}": x for i, x in enumerate(inputs)}, **reference)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    load_bundle(staging)  # refuses a head whose encoder identity differs
    staging.rename(target)
    return target
