"""New versions of installed bundles: with a trained head on their embeddings, or with a zero-shot finding."""

from __future__ import annotations

import json
import re
import shutil
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
    computed from the reference embeddings, so the parity gate checks the heads too. The new
    version is pinned and unsigned: with trusted keys required, sign it before it serves.
    """
    from engines import load_bundle
    from engines.bundle import MANIFEST
    from engines.heads.serving import apply_heads, served_heads
    from engines.parity import golden
    from engines.pins import pin

    name = f"{finding} (head)" if finding in {f.name for f in bundle.findings} else finding
    coded = sr_code(bundle, finding, code)
    version, target = new_version(settings, bundle, finding, version, "head")
    manifest = json.loads(json.dumps(bundle.manifest))
    heads = [h for h in manifest.get("heads", []) if h["name"] != name] + [{"name": name, "code": coded, "head": doc}]
    manifest.update(version=version, heads=heads, derived_from={
        "name": bundle.name, "version": bundle.version, "model_sha256": bundle.model_sha256,
        "encoder_sha256": bundle.encoder_sha256, "added_head": name})
    inputs, reference = golden(bundle)
    encoder = len(bundle.findings)
    reference["probabilities"] = np.concatenate(
        [reference["probabilities"][:, :encoder], apply_heads(served_heads(heads), reference["embeddings"])], axis=1)
    staging = _staging(target)
    shutil.copytree(bundle.path, staging)
    np.savez(staging / manifest["files"]["golden"], **{f"input_{i}": x for i, x in enumerate(inputs)}, **reference)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    pin(staging)  # the copy's own pins; a signature of the base bundle no longer applies
    load_bundle(staging)  # refuses a head whose encoder identity differs
    staging.rename(target)
    return target


def install_zero_shot(settings: Settings, bundle: Any, finding: str, positive: list[str], negative: list[str],
                      version: str | None, code: str | None, threshold: float | None) -> Path:
    """Install a copy of ``bundle`` with the zero-shot ``finding`` prompted as a new version.

    A finding the bundle already has is re-prompted (its code and threshold kept unless given);
    a new one needs ``code``. The version defaults to ``<base version>+zs.<finding>.<n>``.
    """
    from engines.importers.zero_shot_finding import add_finding

    known = {f.name: f for f in bundle.findings}
    spec = {"name": finding, "code": sr_code(bundle, finding, code),
            "threshold": threshold if threshold is not None else known[finding].threshold if finding in known
            else 0.5}
    if not 0.0 < spec["threshold"] < 1.0:
        raise ValueError(f"--threshold must be a probability in (0, 1), got {threshold}")
    version, target = new_version(settings, bundle, finding, version, "zs")
    staging = _staging(target)
    add_finding(bundle, staging, finding=spec, positive=positive, negative=negative, version=version)
    staging.rename(target)
    return target


def sr_code(bundle: Any, finding: str, code: str | None) -> dict[str, str]:
    """The SR code of ``finding``: from ``code`` (``VALUE,SCHEME,MEANING``) or the bundle's own finding."""
    if code:
        parts = [p.strip() for p in code.split(",", 2)]
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"--code must be VALUE,SCHEME,MEANING, got {code!r}")
        return dict(zip(("value", "scheme", "meaning"), parts, strict=True))
    known = {f.name: f for f in bundle.findings}
    if finding not in known:
        raise ValueError(f"{finding!r} is not a finding of {bundle.name}; give its SR code with "
                         "--code VALUE,SCHEME,MEANING (e.g. a SNOMED CT concept, scheme SCT)")
    spec = known[finding]
    return {"value": spec.code_value, "scheme": spec.code_scheme, "meaning": spec.code_meaning}


def new_version(settings: Settings, bundle: Any, finding: str, version: str | None, tag: str) -> tuple[str, Path]:
    """The new version (default ``<base>+TAG.<finding>.<n>``, first n free) and its directory, not yet made."""
    root = settings.effective_models_dir
    base = bundle.version.split("+")[0]
    n = 1
    while version is None and (root / slug(f"{bundle.name}-{base}+{tag}.{slug(finding)}.{n}")).exists():
        n += 1
    version = version or f"{base}+{tag}.{slug(finding)}.{n}"
    target = root / slug(f"{bundle.name}-{version}")
    if target.exists():
        raise ValueError(f"{target} exists: choose another --version")
    return version, target


def _staging(target: Path) -> Path:
    staging = target.parent / f".{target.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    return staging
