"""``pleura eval`` and ``pleura heads train|curve``: offline evaluation and data-efficient heads.

Labels come from a CSV keyed by image file name (column ``image``, ``Image Index``, ``filename``
or ``--image-column``), either NIH-style (``findings`` or ``Finding Labels``: names joined by
``|``, ``No Finding`` for none; the finding ``Abnormal`` then means any label but ``No Finding``)
or one 0/1 column per finding. Patients come from ``patient_id``/``Patient ID`` (or
``--patient-column``); without one, every image counts as its own patient. Images are PNG/JPEG
or DICOM files under ``--images``; rows whose image is absent are left out and counted.
Embeddings and probabilities are cached in ``OUT/embeddings.npz`` per bundle model hash.

``heads train --from-ledger`` reads instead the embeddings the worker archived (table
``embeddings``) for the current bundle (``PLEURA_MODEL``/``--model``), labelled by a CSV keyed by
``StudyInstanceUID`` (each of the study's images gets the study's label) or ``SOPInstanceUID``.
Those vectors are unit length, so the head reads ``unit_embedding``. Patient-level folds group by
the CSV's patient column if it has one, else by study (the ledger keeps no patient key).
``--write-bundle`` installs a new bundle version with the head (:func:`write_bundle`).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.settings import Settings

IMAGE_COLUMNS = ("image", "Image Index", "image_name", "filename", "file")
PATIENT_COLUMNS = ("patient_id", "Patient ID", "PatientID")
LIST_COLUMNS = ("findings", "Finding Labels")
NONE_LABEL = "No Finding"
CACHE = "embeddings.npz"


@dataclass(frozen=True)
class LabelTable:
    """Rows of a labels CSV whose image was found under the images folder."""

    names: list[str]
    paths: list[Path]
    patients: list[str]
    rows: list[dict[str, str]]
    list_column: str | None
    has_patients: bool
    n_missing: int

    def labels(self, finding: str) -> np.ndarray | None:
        """Boolean labels of ``finding``, or None when the CSV does not label it."""
        if self.list_column is not None:
            present = [set(r[self.list_column].split("|")) - {NONE_LABEL, ""} for r in self.rows]
            if finding == "Abnormal":
                return np.array([bool(p) for p in present])
            if not any(finding in p for p in present):
                return None
            return np.array([finding in p for p in present])
        if finding not in self.rows[0]:
            return None
        return np.array([r[finding].strip().lower() in ("1", "1.0", "true", "yes") for r in self.rows])


def read_labels(labels: Path, images: Path, image_column: str | None = None,
                patient_column: str | None = None) -> LabelTable:
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{labels} has no rows")
    columns = list(rows[0])
    image_col = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    if image_col not in columns:
        raise ValueError(f"{labels}: no image-name column (one of {', '.join(IMAGE_COLUMNS)} or --image-column)")
    patient_col = patient_column or next((c for c in PATIENT_COLUMNS if c in columns), None)
    if patient_column and patient_column not in columns:
        raise ValueError(f"{labels}: no column {patient_column!r}")
    files = {p.name: p for p in sorted(images.rglob("*")) if p.is_file()}
    kept = [r for r in rows if r[image_col] in files]
    if not kept:
        raise ValueError(f"none of the {len(rows)} images named in {labels} is under {images}")
    names = [r[image_col] for r in kept]
    return LabelTable(
        names=names,
        paths=[files[n] for n in names],
        patients=[r[patient_col] for r in kept] if patient_col else names,
        rows=kept,
        list_column=next((c for c in LIST_COLUMNS if c in columns), None),
        has_patients=patient_col is not None,
        n_missing=len(rows) - len(kept),
    )


def read_image(path: Path) -> np.ndarray:
    """A 2-D float32 MONOCHROME2 image in [0, 1] from a PNG/JPEG (by its bit depth) or a DICOM file."""
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im if im.mode in ("L", "I;16", "I") else im.convert("L"))
        top = 65535.0 if pixels.dtype != np.uint8 else 255.0
        return (pixels.astype(np.float32) / np.float32(top)).clip(0.0, 1.0)
    import pydicom

    from dicom_node.pixels import decode

    return decode(pydicom.dcmread(path))


def embed(settings: Settings, model: str, backend: str, table: LabelTable, cache: Path,
          progress=print) -> tuple[Any, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(bundle, embeddings, probabilities) of the table's images, from ``cache`` where it holds them."""
    from worker import models

    bundle = models.bundle(settings, model)
    known: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["model_sha256"]) == bundle.model_sha256:
                known = {str(n): (e, p) for n, e, p in zip(z["images"], z["embeddings"], z["probabilities"],
                                                           strict=True)}
    todo = [i for i, n in enumerate(table.names) if n not in known]
    if todo:
        from engines.runtime import load

        engine = load(bundle, backend=backend)
        progress(f"running {bundle.name} {bundle.version} on {engine.backend} over {len(todo)} images "
                 f"({len(table.names) - len(todo)} cached)")
        for start in range(0, len(todo), 64):
            part = todo[start:start + 64]
            result = engine.infer([read_image(table.paths[i]) for i in part])
            for i, e, p in zip(part, result.embeddings, result.probabilities, strict=True):
                known[table.names[i]] = (e, p)
        cache.parent.mkdir(parents=True, exist_ok=True)
        names = sorted(known)
        np.savez(cache, images=np.array(names), embeddings=np.stack([known[n][0] for n in names]),
                 probabilities=np.stack([known[n][1] for n in names]),
                 findings=np.array([f.name for f in bundle.findings]), bundle_name=bundle.name,
                 bundle_version=bundle.version, model_sha256=bundle.model_sha256)
    embeddings = np.stack([known[n][0] for n in table.names]).astype(np.float32)
    return bundle, embeddings, np.stack([known[n][1] for n in table.names]).astype(np.float32)


UID_COLUMNS = ("StudyInstanceUID", "SOPInstanceUID")


def ledger_table(settings: Settings, model: str, labels: Path,
                 patient_column: str | None = None) -> tuple[Any, LabelTable, np.ndarray]:
    """(bundle, table, unit embeddings) of the archived images of ``model`` that the CSV labels."""
    from sqlalchemy import select

    from worker import models
    from worker.ledger import Embedding, Instance, Study
    from worker.ledger.db import Ledger

    bundle = models.bundle(settings, model)
    with open(labels, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    key = next((c for c in UID_COLUMNS if c in columns), None)
    if key is None:
        raise ValueError(f"{labels}: --from-ledger needs a {' or '.join(UID_COLUMNS)} column")
    patient_col = patient_column or next((c for c in PATIENT_COLUMNS if c in columns), None)
    by_uid = {r[key]: r for r in rows}
    ledger = Ledger(settings.effective_database_url)
    try:
        with ledger.session() as s:
            found = s.execute(
                select(Instance.sop_instance_uid, Study.study_instance_uid, Embedding.vector)
                .join(Instance, Instance.id == Embedding.instance_id).join(Study, Study.id == Embedding.study_id)
                .where(Embedding.bundle_name == bundle.name, Embedding.bundle_version == bundle.version)
                .order_by(Instance.sop_instance_uid)).all()
    finally:
        ledger.engine.dispose()
    kept = [(sop, study, vector) for sop, study, vector in found
            if (study if key == "StudyInstanceUID" else sop) in by_uid]
    if not kept:
        raise ValueError(f"the ledger holds no {bundle.name} {bundle.version} embedding of the {len(rows)} "
                         f"UIDs in {labels}")
    csv_rows = [by_uid[study if key == "StudyInstanceUID" else sop] for sop, study, _ in kept]
    table = LabelTable(
        names=[sop for sop, _, _ in kept], paths=[], rows=csv_rows,
        patients=[r[patient_col] for r in csv_rows] if patient_col else [study for _, study, _ in kept],
        list_column=next((c for c in LIST_COLUMNS if c in columns), None), has_patients=patient_col is not None,
        n_missing=len(rows) - len({r[key] for r in csv_rows}))
    return bundle, table, np.stack([np.frombuffer(v, dtype=np.float32) for _, _, v in kept])


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


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "finding"


def _identity(bundle) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"name": bundle.name, "version": bundle.version, "model_sha256": bundle.model_sha256,
            "encoder_sha256": bundle.encoder_sha256}


def _dataset(args: argparse.Namespace, table: LabelTable) -> dict[str, Any]:
    return {"labels_csv": Path(args.labels).name, "n_images": len(table.names),
            "n_rows_without_image": table.n_missing, "n_patients": len(set(table.patients)),
            "patients": "patient column" if table.has_patients else "none given: grouped by study"
            if getattr(args, "from_ledger", False) else "none given: each image its own patient",
            "source": "ledger embeddings (unit length)" if getattr(args, "from_ledger", False) else "images"}


def cmd_eval(settings: Settings, args: argparse.Namespace) -> None:
    """Per-finding AUC (bootstrap CI), ROC PNGs and summary.json for a bundle over labelled images."""
    from engines.demo.crossval import auc_summary
    from engines.demo.metrics import roc_curve
    from engines.heads.plots import roc_png

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    table = read_labels(args.labels, args.images, args.image_column, args.patient_column)
    bundle, _, probs = embed(settings, args.model, args.backend, table, out / CACHE)
    findings, skipped = {}, {}
    for j, spec in enumerate(bundle.findings):
        y = table.labels(spec.name)
        if y is None or y.all() or not y.any():
            skipped[spec.name] = "not labelled in the CSV" if y is None else "labels hold only one class"
            continue
        p = probs[:, j]
        positive = p >= spec.threshold
        findings[spec.name] = {
            **auc_summary(y, p, seed=j),
            "bundle_threshold": spec.threshold,
            "sensitivity_at_threshold": round(float(positive[y].mean()), 4),
            "specificity_at_threshold": round(float((~positive[~y]).mean()), 4),
            "roc_png": f"roc-{slug(spec.name)}.png",
        }
        fpr, tpr, _ = roc_curve(y, p)
        f = findings[spec.name]
        roc_png({spec.name: (fpr, tpr, f"{spec.name} AUC {f['auc']:.3f} {f['auc_ci95']}")}, out / f["roc_png"],
                f"{bundle.name} {bundle.version}: {spec.name} (n={len(y)})",
                points={spec.name: (1 - f["specificity_at_threshold"], f["sensitivity_at_threshold"])})
    summary = {"bundle": _identity(bundle), "dataset": _dataset(args, table), "findings": findings,
               "skipped": skipped,
               "method": "AUC over all labelled images with percentile-bootstrap 95% CI (2000 resamples); "
                         "sensitivity/specificity at the bundle's own threshold"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, f in findings.items():
        print(f"{name}: AUC {f['auc']:.3f} {f['auc_ci95']} ({f['n_positive']}/{f['n']} positive)")
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    print(f"wrote {out / 'summary.json'}")


def _head_inputs(settings: Settings, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if getattr(args, "from_ledger", False):
        bundle, table, x = ledger_table(settings, args.model or settings.model, args.labels, args.patient_column)
    elif args.images is None:
        raise ValueError("give --images (or --from-ledger)")
    else:
        table = read_labels(args.labels, args.images, args.image_column, args.patient_column)
    y = table.labels(args.finding)
    if y is None:
        raise ValueError(f"{args.finding!r} is not labelled in {args.labels}")
    if y.sum() < 2 or (~y).sum() < 2:
        raise ValueError(f"{args.finding!r}: need at least 2 positives and 2 negatives, have {int(y.sum())}/{len(y)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not getattr(args, "from_ledger", False):
        bundle, x, _ = embed(settings, args.model or "demo", args.backend, table, args.cache or args.out / CACHE)
    return table, y, bundle, x


def cmd_heads_train(settings: Settings, args: argparse.Namespace) -> None:
    """Cross-validate, then fit on everything and write ``head-FINDING.json`` and ``roc-FINDING.png``."""
    from engines.demo.metrics import roc_curve
    from engines.heads import cross_validate, fit_logistic, head_document, operating_point
    from engines.heads.plots import roc_png

    table, y, bundle, x = _head_inputs(settings, args)
    cv = cross_validate(x, y, table.patients, k=args.folds, seed=args.seed, l2=args.l2)
    summary = cv.summary(y, seed=args.seed)
    sensitivity = 0.9 if args.target_sensitivity is None and args.target_specificity is None \
        else args.target_sensitivity
    point = operating_point(y, cv.scores, sensitivity=sensitivity, specificity=args.target_specificity)
    head = fit_logistic(x, y, l2=args.l2)
    name = slug(args.finding)
    training = {
        **_dataset(args, table),
        "n_positive": int(y.sum()),
        "l2": args.l2,
        "seed": args.seed,
        "cross_validation": {**summary, "method": "stratified patient-level k-fold; AUC over pooled out-of-fold "
                                                  "probabilities, percentile-bootstrap 95% CI (2000 resamples)"},
        "operating_point": {**point.as_dict(), "chosen_on": "out-of-fold probabilities; the final head is "
                                                            "refitted on all images and uses this threshold"},
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    doc = head_document(args.finding, head, point.as_dict(), _identity(bundle), training)
    if args.from_ledger:
        doc["input"] = "unit_embedding"
        doc["probability"] = "sigmoid(unit(embedding) . weights + bias)"
    (args.out / f"head-{name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    fpr, tpr, _ = roc_curve(y, cv.scores)
    roc_png({args.finding: (fpr, tpr, f"AUC {summary['auc']:.3f} {summary['auc_ci95']} (out-of-fold)")},
            args.out / f"roc-{name}.png", f"{args.finding} head on {bundle.name} {bundle.version} embeddings",
            points={args.finding: (1 - point.specificity, point.sensitivity)})
    print(f"{args.finding}: cross-validated AUC {summary['auc']:.3f} {summary['auc_ci95']} "
          f"({summary['n_positive']}/{summary['n']} positive, {args.folds} patient-level folds)")
    print(f"threshold {point.threshold:.4f} ({point.rule}): sensitivity {point.sensitivity:.3f}, "
          f"specificity {point.specificity:.3f}")
    print(f"wrote {args.out / f'head-{name}.json'} and {args.out / f'roc-{name}.png'}")
    if args.write_bundle:
        target = write_bundle(settings, bundle, args.finding, doc, args.version, args.code)
        print(f"installed bundle version {json.loads((target / 'manifest.json').read_text())['version']} "
              f"at {target}; serve it with PLEURA_MODEL={target.name} and restart pleura serve/worker")


def parse_sizes(text: str) -> list[int]:
    """``10,25,all`` -> [10, 25, a size no pool reaches]."""
    return [sys.maxsize if s.strip() == "all" else int(s) for s in text.split(",")]


def cmd_heads_curve(settings: Settings, args: argparse.Namespace) -> None:
    """Learning curve: ``curve-FINDING.json`` and ``.png``."""
    from engines.heads import learning_curve
    from engines.heads.plots import curve_png

    table, y, bundle, x = _head_inputs(settings, args)
    curve = learning_curve(x, y, table.patients, parse_sizes(args.sizes), repeats=args.repeats, k=args.folds,
                           seed=args.seed, l2=args.l2)
    result = {"finding": args.finding, "bundle": _identity(bundle), "dataset": _dataset(args, table), **curve}
    name = slug(args.finding)
    (args.out / f"curve-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    curve_png({args.finding: curve}, args.out / f"curve-{name}.png",
              f"{args.finding}: head on {bundle.name} {bundle.version} embeddings")
    for p in curve["points"]:
        print(f"n={p['n_labelled_mean']:g}: AUC {p['auc_mean']:.3f} +- {p['auc_std']:.3f} ({p['draws']} draws)")
    print(f"wrote {args.out / f'curve-{name}.json'} and .png")


def _common(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--images", type=Path, required=required, help="folder of PNG/JPEG or DICOM images")
    p.add_argument("--labels", type=Path, required=True, help="CSV keyed by image file name")
    p.add_argument("--model", default=None if not required else "demo",
                   help="bundle name or path (default: demo; with --from-ledger: PLEURA_MODEL)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--image-column")
    p.add_argument("--patient-column")


def _head_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    _common(p, required)
    p.add_argument("--finding", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", type=Path, help=f"embedding cache (default OUT/{CACHE})")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--l2", type=float, default=1.0, help="L2 penalty on standardised features (default 1)")
    p.add_argument("--seed", type=int, default=0)


def _guarded(func):  # type: ignore[no-untyped-def]
    def run(settings: Settings, args: argparse.Namespace) -> None:
        from engines import BackendUnavailable, BundleError, ParityError

        try:
            func(settings, args)
        except (ParityError, BundleError, BackendUnavailable, FileNotFoundError, ValueError, RuntimeError) as exc:
            sys.exit(f"error: {exc}")

    return run


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` and ``heads`` to the ``pleura`` subcommands."""
    p = sub.add_parser("eval", help="run a bundle over labelled images: AUCs with CIs, ROC PNGs, JSON")
    _common(p)
    p.add_argument("--out", type=Path, default=Path("pleura-eval"))
    p.set_defaults(func=_guarded(cmd_eval))
    p = sub.add_parser("heads", help="data-efficient heads on a bundle's embeddings: train, curve")
    heads = p.add_subparsers(dest="action", required=True)
    h = heads.add_parser("train", help="logistic head, patient-level CV AUC, ROC, threshold, head file")
    _head_options(h, required=False)
    h.add_argument("--from-ledger", action="store_true",
                   help="use the embeddings the worker archived; labels keyed by StudyInstanceUID or SOPInstanceUID")
    h.add_argument("--write-bundle", action="store_true", help="install a new bundle version carrying the head")
    h.add_argument("--version", help="version of the new bundle (default <version>+head.<finding>.<n>)")
    h.add_argument("--code", help="VALUE,SCHEME,MEANING: SR code of a finding the bundle does not have")
    target = h.add_mutually_exclusive_group()
    target.add_argument("--target-sensitivity", type=float, help="default 0.9 unless a specificity is given")
    target.add_argument("--target-specificity", type=float)
    h.set_defaults(func=_guarded(cmd_heads_train))
    h = heads.add_parser("curve", help="AUC against the number of labelled images (PNG + JSON)")
    _head_options(h)
    h.add_argument("--sizes", default="10,25,50,100,200,all")
    h.add_argument("--repeats", type=int, default=20)
    h.set_defaults(func=_guarded(cmd_heads_curve))
