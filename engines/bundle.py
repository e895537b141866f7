"""Model bundles: a directory with ``manifest.json``, the encoder, golden inputs and a model card.

``load_bundle`` reads and validates the manifest, so that a broken bundle fails at install or
start-up time with a message naming the file and the field, never halfway through a study.

Manifest (``schema_version`` 1; ``engines/bundles/demo/manifest.json`` is a full example):

- ``name``, ``version``, ``description``, ``licence``, ``source`` (data, attribution, how built);
- ``intended_use``: ``modalities``, ``body_parts``, ``views``, ``min_age_years``;
- ``input``: ``size`` [h, w], ``channels`` (1), ``resize`` (``policy`` "letterbox" with
  ``pad_value``, or "center_crop"), ``normalization`` (``mean_std`` with mean/std, or ``range`` with low/high);
- ``architecture``: what :mod:`engines.architectures` builds for the torch backend;
- ``outputs``: ``embedding_dim``, ``map`` (``size`` [h, w], ``feature_stride``);
- ``findings``: name, ``code`` (value, scheme, meaning), operating ``threshold``, optionally
  ``triage`` (true: a positive flags the study for the worklist unless the site chooses others);
- ``files``: ``onnx``, ``golden``, optionally ``torch_state_dict``, ``model_card``...;
- ``pins``: the SHA-256 of every file in the directory (:mod:`engines.pins`); a pinned bundle whose
  files differ, are missing or were added is refused, naming the files. Optionally signed
  (``manifest.sig``, :mod:`engines.signing`): with trusted keys given, an unsigned or
  wrongly signed bundle is refused;
- ``parity``: ``tolerance`` per precision (``fp32`` required; ``fp16`` permits fp16);
- optionally ``heads``: logistic heads on the embedding (:mod:`engines.heads.serving`), each
  reported as one more finding after the encoder's, and refused unless it records this
  bundle's :attr:`Bundle.encoder_sha256`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, NoReturn

from engines import pins, signing
from engines.heads.serving import check_heads
from engines.pins import MANIFEST

#: Built-in bundles shipped inside the package.
BUILTIN_DIR = Path(__file__).resolve().parent / "bundles"

SCHEMA_VERSION = 1


class BundleError(ValueError):
    """A bundle is missing, or its manifest or files are not what the format requires."""


@dataclass(frozen=True)
class FindingSpec:
    """One output of a bundle: a coded finding and its operating threshold on the probability."""

    name: str
    code_value: str
    code_scheme: str
    code_meaning: str
    threshold: float
    #: the manifest marks it as a triage finding (the default set of what flags a study)
    triage: bool = False


@dataclass(frozen=True)
class Bundle:
    """A validated model bundle on disk."""

    name: str
    version: str
    path: Path
    manifest: dict[str, Any]
    findings: tuple[FindingSpec, ...]
    intended_use: dict[str, Any]
    sha256: str
    #: Findings of the manifest's ``heads``, reported after :attr:`findings` (the encoder's outputs).
    head_findings: tuple[FindingSpec, ...] = ()
    #: The manifest pins the files, and they matched when loaded.
    pinned: bool = False
    #: Id of the trusted key whose signature was verified at load (None: no trusted keys were given).
    signer: str | None = None
    #: SHA-256 (hex) of each file as read at load, by relative path.
    file_sha256: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def reported_findings(self) -> tuple[FindingSpec, ...]:
        """Every finding the engine reports: the encoder's, then the heads'."""
        return self.findings + self.head_findings

    @cached_property
    def encoder_sha256(self) -> str:
        """SHA-256 of the encoder alone: the manifest's ``input``, ``architecture`` and ``outputs``
        and the weight files (every file but ``golden`` and ``model_card``).

        Unlike :attr:`model_sha256` it ignores heads, thresholds and golden outputs, so a bundle
        made by adding a head to another has the same encoder identity, which its heads record.
        """
        spec = {key: self.manifest[key] for key in ("input", "architecture", "outputs")}
        digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
        for role, name in sorted(self.manifest["files"].items()):
            if role not in ("golden", "model_card"):
                digest.update(role.encode() + b"\0" + self._digest(name))
        return digest.hexdigest()

    @cached_property
    def model_sha256(self) -> str:
        """SHA-256 of what decides the outputs: the manifest (but its pins) and every file but the model card.

        Two bundles with the same name and version but different weights or thresholds differ
        here, so results derived from it (e.g. DICOM UIDs) never collide.
        """
        manifest = {key: value for key, value in self.manifest.items() if key != "pins"}
        digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
        for role, name in sorted(self.manifest["files"].items()):
            if role != "model_card":
                digest.update(role.encode() + b"\0" + self._digest(name))
        return digest.hexdigest()

    def _digest(self, name: str) -> bytes:
        known = self.file_sha256.get(Path(name).as_posix())
        return bytes.fromhex(known) if known else hashlib.sha256((self.path / name).read_bytes()).digest()

    def file(self, role: str) -> Path:
        """Path of the bundle file with ``role`` in the manifest's ``files`` (e.g. ``"onnx"``)."""
        return self.path / self.manifest["files"][role]


def builtin_names() -> list[str]:
    """Names of the bundles shipped with the package."""
    if not BUILTIN_DIR.is_dir():
        return []
    return sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / MANIFEST).is_file())


def resolve(name_or_path: str | Path) -> Path:
    """The directory of a built-in bundle called ``name_or_path``, or that path itself."""
    text = str(name_or_path)
    if "/" not in text and "\\" not in text and (BUILTIN_DIR / text / MANIFEST).is_file():
        return BUILTIN_DIR / text
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    raise BundleError(
        f"no model bundle {text!r}: not a built-in bundle (available: {', '.join(builtin_names()) or 'none'}) "
        "and not a directory; pass a built-in name or the path of a bundle directory"
    )


def hash_files(path: Path, digests: dict[str, str] | None = None) -> str:
    """SHA-256 over the bundle's files (relative paths and contents, sorted; hidden files skipped);
    ``digests`` are :func:`engines.pins.file_digests` of ``path`` when already computed."""
    digest = hashlib.sha256()
    for name, file_digest in sorted((digests if digests is not None else pins.file_digests(path)).items()):
        if not any(part.startswith((".", "__")) for part in name.split("/")):
            digest.update(name.encode() + b"\0" + bytes.fromhex(file_digest))
    return digest.hexdigest()


def load_bundle(name_or_path: str | Path, trusted_keys: dict[str, signing.TrustedKey] | None = None) -> Bundle:
    """Load and validate a bundle: a built-in name (``"demo"``) or a bundle directory.

    A pinned bundle's files must match its pins. With ``trusted_keys`` (even empty) the bundle
    must be pinned and signed by one of them. Either failure is a :class:`BundleError` that
    names the files or the key.
    """
    path = resolve(name_or_path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not a model bundle: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc}); fix or reinstall the bundle") from exc
    check = _Checker(manifest_path)
    findings = check.manifest(manifest)
    for role, name in manifest["files"].items():
        if not (path / name).is_file():
            raise BundleError(f"{manifest_path}: files.{role} names {name!r}, which is not in {path}")
    digests = pins.file_digests(path)
    signer = _check_trust(path, manifest, digests, trusted_keys)
    bundle = Bundle(
        name=manifest["name"],
        version=manifest["version"],
        path=path,
        manifest=manifest,
        findings=findings,
        intended_use=manifest["intended_use"],
        sha256=hash_files(path, digests),
        pinned="pins" in manifest,
        signer=signer,
        file_sha256=digests,
    )
    if "heads" not in manifest:
        return bundle
    problems = check_heads(manifest["heads"], bundle.encoder_sha256, manifest["outputs"]["embedding_dim"])
    if problems:
        raise BundleError(f"{manifest_path}: " + "; ".join(problems))
    heads = check.findings([{**item, "threshold": item["head"]["threshold"]} for item in manifest["heads"]],
                           "heads")
    names = [f.name for f in findings + heads]
    if len(set(names)) != len(names):
        check.fail("heads", f"repeat a finding name of the bundle: {names}")
    return replace(bundle, head_findings=heads)


def _check_trust(path: Path, manifest: dict[str, Any], digests: dict[str, str],
                 trusted_keys: dict[str, signing.TrustedKey] | None) -> str | None:
    """Check the pins, and with ``trusted_keys`` the signature; return the signer's key id."""
    try:
        if "pins" in manifest:
            pins.check(path, manifest["pins"], digests)
        if trusted_keys is None:
            return None
        if "pins" not in manifest:
            raise BundleError(f"bundle {path} refused: it is not pinned, and only pinned bundles signed by a "
                              "trusted key may be loaded; pin and sign it (pleura models pin, pleura models sign)")
        return signing.verify(path, trusted_keys).id
    except (pins.PinError, signing.SignatureError) as exc:
        raise BundleError(str(exc)) from exc


class _Checker:
    """Validates a manifest, raising BundleError with the manifest path and the field."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def fail(self, field: str, problem: str) -> NoReturn:
        raise BundleError(f"{self.where}: {field} {problem}")

    def get(self, obj: dict, key: str, kind: type | tuple[type, ...], field: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            self.fail(f"{field}{key}", "is missing")
        value = obj[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.fail(f"{field}{key}", f"must be {_kind_name(kind)}, got {value!r}")
        return value

    def manifest(self, m: Any) -> tuple[FindingSpec, ...]:
        if not isinstance(m, dict):
            self.fail("the manifest", "must be a JSON object")
        if self.get(m, "schema_version", int, "") != SCHEMA_VERSION:
            self.fail("schema_version", f"is {m['schema_version']}; this Pleura reads version {SCHEMA_VERSION}")
        for key in ("name", "version", "description", "licence"):
            if not self.get(m, key, str, "").strip():
                self.fail(key, "must not be empty")
        self.get(m, "source", dict, "")
        self.intended_use(self.get(m, "intended_use", dict, ""))
        self.input(self.get(m, "input", dict, ""))
        self.get(self.get(m, "architecture", dict, ""), "name", str, "architecture.")
        self.outputs(self.get(m, "outputs", dict, ""))
        files = self.get(m, "files", dict, "")
        for role in ("onnx", "golden"):
            self.get(files, role, str, "files.")
        self.parity(self.get(m, "parity", dict, ""))
        return self.findings(self.get(m, "findings", list, ""))

    def intended_use(self, use: dict) -> None:
        for key in ("modalities", "body_parts", "views"):
            values = self.get(use, key, list, "intended_use.")
            if not values or not all(isinstance(v, str) for v in values):
                self.fail(f"intended_use.{key}", "must be a non-empty list of strings")
        self.get(use, "min_age_years", (int, float), "intended_use.")

    def input(self, spec: dict) -> None:
        size = self.get(spec, "size", list, "input.")
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            self.fail("input.size", f"must be [height, width] in pixels, got {size!r}")
        if self.get(spec, "channels", int, "input.") != 1:
            self.fail("input.channels", "must be 1 (grayscale); other layouts are not supported yet")
        resize = self.get(spec, "resize", dict, "input.")
        policy = self.get(resize, "policy", str, "input.resize.")
        if policy not in ("letterbox", "center_crop"):
            self.fail("input.resize.policy", f"is {policy!r}; supported: 'letterbox', 'center_crop'")
        if policy == "letterbox":
            self.get(resize, "pad_value", (int, float), "input.resize.")
        norm = self.get(spec, "normalization", dict, "input.")
        scheme = self.get(norm, "scheme", str, "input.normalization.")
        keys = {"mean_std": ("mean", "std"), "range": ("low", "high")}.get(scheme)
        if keys is None:
            self.fail("input.normalization.scheme", f"is {scheme!r}; supported: 'mean_std', 'range'")
        for key in keys:
            self.get(norm, key, (int, float), "input.normalization.")
        if scheme == "mean_std" and norm["std"] <= 0:
            self.fail("input.normalization.std", "must be positive")

    def outputs(self, out: dict) -> None:
        if self.get(out, "embedding_dim", int, "outputs.") <= 0:
            self.fail("outputs.embedding_dim", "must be positive")
        maps = self.get(out, "map", dict, "outputs.")
        size = self.get(maps, "size", list, "outputs.map.")
        if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
            self.fail("outputs.map.size", f"must be [height, width], got {size!r}")
        if self.get(maps, "feature_stride", int, "outputs.map.") <= 0:
            self.fail("outputs.map.feature_stride", "must be positive")

    def parity(self, parity: dict) -> None:
        tolerance = self.get(parity, "tolerance", dict, "parity.")
        self.get(tolerance, "fp32", dict, "parity.tolerance.")
        for precision, limits in tolerance.items():
            for key in ("embeddings", "probabilities", "maps"):
                value = self.get(limits, key, (int, float), f"parity.tolerance.{precision}.")
                if value <= 0:
                    self.fail(f"parity.tolerance.{precision}.{key}", "must be positive")

    def findings(self, items: list, key: str = "findings") -> tuple[FindingSpec, ...]:
        if not items:
            self.fail(key, "must list at least one finding")
        specs = []
        for i, item in enumerate(items):
            field = f"{key}[{i}]."
            code = self.get(item, "code", dict, field)
            threshold = self.get(item, "threshold", (int, float), field)
            if not 0.0 < threshold < 1.0:
                self.fail(f"{field}threshold", f"must be a probability in (0, 1), got {threshold}")
            triage = item.get("triage", False)
            if not isinstance(triage, bool):
                self.fail(f"{field}triage", f"must be true or false, got {triage!r}")
            specs.append(
                FindingSpec(
                    name=self.get(item, "name", str, field),
                    code_value=self.get(code, "value", str, f"{field}code."),
                    code_scheme=self.get(code, "scheme", str, f"{field}code."),
                    code_meaning=self.get(code, "meaning", str, f"{field}code."),
                    threshold=float(threshold),
                    triage=triage,
                )
            )
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            self.fail(key, f"has duplicate names: {names}")
        return tuple(specs)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)
