"""``pleura eval`` and ``pleura heads train|curve|zero-shot``: offline evaluation, data-efficient and zero-shot
heads.

Data sets come from :mod:`worker.heads.labelled` (image folders with a labels CSV, or the ledger's
archived embeddings with ``--from-ledger``); ``--write-bundle`` installs a new bundle version
with the head (:func:`worker.heads.versions.write_bundle`); ``zero-shot`` adds a finding scored from text
prompts to a language-aligned bundle (:func:`worker.heads.versions.install_zero_shot`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.cli.common import command
from worker.heads.labelled import CACHE, LabelTable, embed, ledger_table, read_labels, report_table
from worker.heads.versions import install_zero_shot, slug, write_bundle
from worker.settings import Settings


def _identity(bundle) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"name": bundle.name, "version": bundle.version, "model_sha256": bundle.model_sha256,
            "encoder_sha256": bundle.encoder_sha256}


def _dataset(args: argparse.Namespace, table: LabelTable) -> dict[str, Any]:
    source = (f"final reports (uncertain: {args.uncertain}; rows left out: studies whose report is uncertain)"
              if getattr(args, "labels_from_reports", False) else Path(args.labels).name)
    return {"labels_csv": source, "n_images": len(table.names),
            "n_rows_without_image": table.n_missing, "n_patients": len(set(table.patients)),
            "patients": "patient column" if table.has_patients else "none given: grouped by study"
            if getattr(args, "from_ledger", False) else "none given: each image its own patient",
            "source": "ledger embeddings (unit length)" if getattr(args, "from_ledger", False) else "images"}


def _progress(args: argparse.Namespace) -> Callable[[str], None]:
    """Where progress lines go: stdout with the text, stderr under ``--json`` (stdout holds the document)."""
    return (lambda message: print(message, file=sys.stderr)) if args.json else print


def _print_json(document: dict[str, Any]) -> None:
    print(json.dumps(document, indent=2))


def cmd_eval(settings: Settings, args: argparse.Namespace) -> None:
    """Per-finding AUC (bootstrap CI), ROC PNGs and summary.json for a bundle over labelled images;
    ``--json`` prints summary.json's document."""
    from engines.evaluation.folds import auc_summary
    from engines.evaluation.metrics import roc_curve
    from engines.heads.plots import roc_png

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    table = read_labels(args.labels, args.images, args.image_column, args.patient_column)
    bundle, _, probs = embed(settings, args.model, args.backend, table, out / CACHE, _progress(args))
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
    if args.json:
        _print_json(summary)
        return
    for name, f in findings.items():
        print(f"{name}: AUC {f['auc']:.3f} {f['auc_ci95']} ({f['n_positive']}/{f['n']} positive)")
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    print(f"wrote {out / 'summary.json'}")


def _head_inputs(settings: Settings, args: argparse.Namespace):  # type: ignore[no-untyped-def]
    if getattr(args, "labels_from_reports", False):
        if not args.from_ledger or args.labels is not None:
            raise ValueError("--labels-from-reports goes with --from-ledger and replaces --labels")
        bundle, table, x = report_table(settings, args.model or settings.model, args.finding, args.uncertain)
    elif args.labels is None:
        raise ValueError("give --labels (or --from-ledger --labels-from-reports)")
    elif getattr(args, "from_ledger", False):
        bundle, table, x = ledger_table(settings, args.model or settings.model, args.labels, args.patient_column)
    elif args.images is None:
        raise ValueError("give --images (or --from-ledger)")
    else:
        table = read_labels(args.labels, args.images, args.image_column, args.patient_column)
    y = table.labels(args.finding)
    if y is None:
        raise ValueError(f"{args.finding!r} is not labelled in {args.labels or 'the reports'}")
    if y.sum() < 2 or (~y).sum() < 2:
        raise ValueError(f"{args.finding!r}: need at least 2 positives and 2 negatives, have {int(y.sum())}/{len(y)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if not getattr(args, "from_ledger", False):
        bundle, x, _ = embed(settings, args.model or "demo", args.backend, table, args.cache or args.out / CACHE,
                             _progress(args))
    return table, y, bundle, x


def cmd_heads_train(settings: Settings, args: argparse.Namespace) -> None:
    """Cross-validate, then fit on everything and write ``head-FINDING.json`` and ``roc-FINDING.png``;
    ``--json`` prints the cross-validation, the operating point and what was written."""
    from engines.evaluation.metrics import roc_curve
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
    if not args.json:
        print(f"{args.finding}: cross-validated AUC {summary['auc']:.3f} {summary['auc_ci95']} "
              f"({summary['n_positive']}/{summary['n']} positive, {args.folds} patient-level folds)")
        print(f"threshold {point.threshold:.4f} ({point.rule}): sensitivity {point.sensitivity:.3f}, "
              f"specificity {point.specificity:.3f}")
        print(f"wrote {args.out / f'head-{name}.json'} and {args.out / f'roc-{name}.png'}")
    installed = _installed(write_bundle(settings, bundle, args.finding, doc, args.version, args.code)) \
        if args.write_bundle else None
    if args.json:
        _print_json({"finding": args.finding, "bundle": _identity(bundle), "cross_validation": summary,
                     "operating_point": point.as_dict(), "head": str(args.out / f"head-{name}.json"),
                     "roc_png": str(args.out / f"roc-{name}.png"), "installed_bundle": installed})
    elif installed:
        print(f"installed bundle version {installed['version']} at {installed['path']}; serve it with "
              f"PLEURA_MODEL={installed['name']} and restart pleura serve/worker")


def _installed(target: Path) -> dict[str, str]:
    """The bundle version written at ``target``: its directory name (for PLEURA_MODEL), version, path."""
    return {"name": target.name, "version": json.loads((target / "manifest.json").read_text())["version"],
            "path": str(target)}


def cmd_heads_zero_shot(settings: Settings, args: argparse.Namespace) -> None:
    """Install a new version of a language-aligned bundle with a finding scored from text prompts;
    ``--json`` prints the finding, its prompts and threshold, and the bundle installed."""
    from worker.bundles.catalogue import bundle as find_bundle

    bundle = find_bundle(settings, args.model or settings.model)
    target = install_zero_shot(settings, bundle, args.finding, args.positive, args.negative, args.version,
                               args.code, args.threshold)
    manifest = json.loads((target / "manifest.json").read_text())
    spec = next(f for f in manifest["findings"] if f["name"] == args.finding)
    if args.json:
        _print_json({"finding": args.finding, "scoring": manifest["architecture"]["scoring"],
                     "positive": args.positive, "negative": args.negative, "threshold": spec["threshold"],
                     "installed_bundle": _installed(target)})
        return
    print(f"{args.finding}: zero-shot ({manifest['architecture']['scoring']} scoring) from {len(args.positive)} "
          f"positive and {len(args.negative)} negative prompt(s), threshold {spec['threshold']}")
    print(f"installed bundle version {manifest['version']} at {target}; check it on labelled images with "
          f"pleura eval --model {target.name}, serve it with PLEURA_MODEL={target.name} and restart pleura "
          "serve/worker")


def parse_sizes(text: str) -> list[int]:
    """``10,25,all`` -> [10, 25, a size no pool reaches]."""
    return [sys.maxsize if s.strip() == "all" else int(s) for s in text.split(",")]


def cmd_heads_curve(settings: Settings, args: argparse.Namespace) -> None:
    """Learning curve: ``curve-FINDING.json`` and ``.png``; ``--json`` prints the curve's document."""
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
    if args.json:
        _print_json(result)
        return
    for p in curve["points"]:
        print(f"n={p['n_labelled_mean']:g}: AUC {p['auc_mean']:.3f} +- {p['auc_std']:.3f} ({p['draws']} draws)")
    print(f"wrote {args.out / f'curve-{name}.json'} and .png")


def _common(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--images", type=Path, required=required, help="folder of PNG/JPEG or DICOM images")
    p.add_argument("--labels", type=Path, required=required, help="CSV keyed by image file name")
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
    _json_option(p)


def _guarded(func):  # type: ignore[no-untyped-def]
    def run(settings: Settings, args: argparse.Namespace) -> None:
        from engines import BackendUnavailable, BundleError, ParityError

        try:
            func(settings, args)
        except (ParityError, BundleError, BackendUnavailable, FileNotFoundError, ValueError, RuntimeError) as exc:
            sys.exit(f"error: {exc}")

    return run


def _json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the results as a JSON document instead of text")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` and ``heads`` to the ``pleura`` subcommands."""
    p = command(sub, "eval", "measure a model on labelled images (AUC, ROC plots)")
    _common(p)
    p.add_argument("--out", type=Path, default=Path("pleura-eval"),
                   help="folder for summary.json and the ROC PNGs (default pleura-eval)")
    _json_option(p)
    p.set_defaults(func=_guarded(cmd_eval))
    p = command(sub, "heads", "train or add finding classifiers on a model's embeddings")
    heads = p.add_subparsers(dest="action", required=True)
    h = command(heads, "train", "train a logistic head: patient-level cross-validated AUC, ROC plot, threshold, "
                                 "head file")
    _head_options(h, required=False)
    h.add_argument("--from-ledger", action="store_true",
                   help="use the embeddings the worker archived; labels keyed by StudyInstanceUID or SOPInstanceUID")
    h.add_argument("--labels-from-reports", action="store_true",
                   help="with --from-ledger: label each study by its final report (worker.reports) instead of a CSV")
    h.add_argument("--uncertain", choices=["exclude", "positive", "negative"], default="exclude",
                   help="with --labels-from-reports: how an uncertain mention counts (default: left out)")
    h.add_argument("--write-bundle", action="store_true", help="install a new bundle version carrying the head")
    h.add_argument("--version", help="version of the new bundle (default <version>+head.<finding>.<n>)")
    h.add_argument("--code", help="VALUE,SCHEME,MEANING: SR code of a finding the bundle does not have")
    target = h.add_mutually_exclusive_group()
    target.add_argument("--target-sensitivity", type=float, help="default 0.9 unless a specificity is given")
    target.add_argument("--target-specificity", type=float)
    h.set_defaults(func=_guarded(cmd_heads_train))
    h = command(heads, "curve", "how AUC grows with the number of labelled images (PNG + JSON)")
    _head_options(h)
    h.add_argument("--sizes", default="10,25,50,100,200,all")
    h.add_argument("--repeats", type=int, default=20)
    h.set_defaults(func=_guarded(cmd_heads_curve))
    h = command(heads, "zero-shot", "install a new bundle version with a finding scored from text prompts "
                                     "(language-aligned bundles)")
    h.add_argument("--model", help="bundle name or path (default: PLEURA_MODEL)")
    h.add_argument("--finding", required=True, help="finding name; an existing one is re-prompted")
    h.add_argument("--positive", action="append", required=True, help="prompt for the finding (repeatable)")
    h.add_argument("--negative", action="append", required=True, help="prompt for its absence (repeatable)")
    h.add_argument("--threshold", type=float, help="operating threshold (default 0.5, or the finding's own)")
    h.add_argument("--version", help="version of the new bundle (default <version>+zs.<finding>.<n>)")
    h.add_argument("--code", help="VALUE,SCHEME,MEANING: SR code of a finding the bundle does not have")
    _json_option(h)
    h.set_defaults(func=_guarded(cmd_heads_zero_shot))
