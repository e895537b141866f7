"""``pleura models``: list, verify, pin, sign, build and import model bundles.

Bundles are found by name among the built-in ones (``engines/bundles``) and the operator's
installed ones (``PLEURA_MODELS_DIR``, default ``<data dir>/models``), or given as a path.
With ``PLEURA_TRUSTED_KEYS`` set, every bundle loaded here must be pinned and signed by one of
those keys (:mod:`engines.signing`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engines import Bundle, BundleError, load_bundle, pins, signing
from engines.bundle import BUILTIN_DIR, MANIFEST
from engines.bundle import resolve as find_bundle
from engines.runtime import check_backends
from worker.settings import Settings


def resolve(settings: Settings, name_or_path: str) -> Path | str:
    """An installed bundle's directory for ``name_or_path``, or the argument unchanged."""
    installed = settings.effective_models_dir / name_or_path
    if "/" not in name_or_path and (installed / MANIFEST).is_file():
        return installed
    return name_or_path


def trusted_keys(settings: Settings) -> dict[str, signing.TrustedKey] | None:
    """The keys of ``PLEURA_TRUSTED_KEYS`` by id, or None when it is not set (signatures not required)."""
    if not settings.trusted_keys:
        return None
    try:
        return signing.load_trusted_keys(settings.trusted_keys)
    except signing.SignatureError as exc:
        raise BundleError(f"PLEURA_TRUSTED_KEYS: {exc}") from exc


def bundle(settings: Settings, name_or_path: str) -> Bundle:
    """The bundle, its pins checked and, with trusted keys set, its signature too."""
    return load_bundle(resolve(settings, name_or_path), trusted_keys(settings))


def listing(settings: Settings) -> list[dict[str, Any]]:
    """Every bundle Pleura can find, built-in first, with what it is for."""
    rows = []
    for origin, root in (("built-in", BUILTIN_DIR), ("installed", settings.effective_models_dir)):
        if not root.is_dir():
            continue
        for path in sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()):
            try:
                b = load_bundle(path)
            except ValueError as exc:
                rows.append({"name": path.name, "origin": origin, "path": str(path), "error": str(exc)})
                continue
            rows.append({
                "name": b.name,
                "version": b.version,
                "origin": origin,
                "path": str(b.path),
                "sha256": b.sha256,
                "pinned": b.pinned,
                "signed": (b.path / pins.SIGNATURE).is_file(),
                "findings": [f.name for f in b.reported_findings],
                "heads": [f.name for f in b.head_findings],
                "intended_use": b.intended_use,
                "description": b.manifest.get("description", ""),
            })
    return rows


def verify(settings: Settings, name_or_path: str, backend: str = "all") -> dict[str, Any]:
    """Check the bundle's pins, its signature (with trusted keys set) and the parity gate on every
    backend of this host (or only ``backend``). ``passed`` is false when any check that could run failed.

    Raises BundleError for what is not a bundle at all (no manifest, an invalid one).
    """
    path = find_bundle(resolve(settings, name_or_path))
    try:
        loaded = load_bundle(path)
    except BundleError as exc:
        if not isinstance(exc.__cause__, pins.PinError):
            raise
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        return {"bundle": str(path), "name": manifest.get("name"), "version": manifest.get("version"),
                "passed": False, "pins": {"status": "failed", "detail": str(exc)},
                "signature": {"status": "not checked", "detail": "the pins failed"}, "backends": []}
    pinned = ({"status": "passed", "detail": f"{len(loaded.manifest['pins'])} files match the manifest's pins"}
              if loaded.pinned else
              {"status": "failed", "detail": "the manifest pins no files, so nothing says they are the ones "
                                             "validated; pin them once verified: pleura models pin"})
    signature = _signature(settings, loaded)
    checks = check_backends(loaded) if backend == "all" else check_backends(loaded, [backend])
    passed = (pinned["status"] == "passed" and signature["status"] != "failed"
              and all(c.status != "failed" for c in checks) and any(c.status == "passed" for c in checks))
    return {"bundle": str(loaded.path), "name": loaded.name, "version": loaded.version, "sha256": loaded.sha256,
            "passed": passed, "pins": pinned, "signature": signature, "backends": [c.as_dict() for c in checks]}


def _signature(settings: Settings, loaded: Bundle) -> dict[str, str]:
    signed = (loaded.path / pins.SIGNATURE).is_file()
    trusted = trusted_keys(settings)
    if trusted is None:
        return {"status": "not checked",
                "detail": f"{'signed' if signed else 'unsigned'}; PLEURA_TRUSTED_KEYS is not set, so not required"}
    try:
        key = signing.verify(loaded.path, trusted)
    except signing.SignatureError as exc:
        return {"status": "failed", "detail": str(exc)}
    return {"status": "passed", "detail": f"signed by trusted key {key.id} ({key.path})"}


def describe(report: dict[str, Any]) -> list[str]:
    """The lines ``pleura models verify`` prints for ``report``: the pins, the signature, one per backend."""
    lines = [f"bundle {report['name']} {report['version']} at {report['bundle']}"]
    lines += [f"{part:<12} {report[part]['status']:<13} {report[part]['detail']}" for part in ("pins", "signature")]
    for check in report["backends"]:
        status = {"passed": "parity PASSED", "failed": "parity FAILED"}.get(check["status"], check["status"])
        ran = f"{check['backend']} ({check['precision']}): " if check["backend"] else ""
        lines.append(f"{check['kind']:<12} {status:<13} {ran}{check['detail']}")
    return lines


def pin(settings: Settings, name_or_path: str) -> tuple[Path, int]:
    """Pin every file of a bundle as it is now (removing a signature it had); returns its path and count."""
    path = _installed(settings, name_or_path)
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path} is not a model bundle: it has no {MANIFEST}")
    count = len(pins.pin(path))
    load_bundle(path)  # the manifest is still valid
    return path, count


def sign(settings: Settings, name_or_path: str, key: Path) -> tuple[Path, str]:
    """Sign a pinned bundle whose files match its pins; returns its path and the signer key's id."""
    loaded = load_bundle(_installed(settings, name_or_path))
    if not loaded.pinned:
        raise BundleError(f"bundle {loaded.path} is not pinned: verify it, pin it (pleura models pin), then sign it")
    try:
        return loaded.path, signing.sign(loaded.path, key)
    except signing.SignatureError as exc:
        raise BundleError(str(exc)) from exc


def _installed(settings: Settings, name_or_path: str) -> Path:
    """The directory of a bundle that is not built in (those are changed only by a release)."""
    path = find_bundle(resolve(settings, name_or_path))
    if path == BUILTIN_DIR or BUILTIN_DIR in path.parents:
        raise BundleError(f"{path} is a built-in bundle: copy it into PLEURA_MODELS_DIR to pin or sign a copy")
    return path
