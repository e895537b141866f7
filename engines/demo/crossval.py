"""Cross-validate the demo bundle's training recipe on the NIH ChestX-ray14 sample.

    python -m engines.demo.crossval --data ../shared/data/nih-cxr14-sample --folds 5 --out engines/bundles/demo

Stratified, patient-level k-fold cross-validation of exactly the recipe that trained the
shipped ``demo`` bundle (:func:`engines.demo.train.train_model`: same architecture, input
path, augmentation, loss, optimizer and auxiliary targets; normalization statistics from each
fold's training part). Every image is scored once, by the model that did not see it; the
out-of-fold probabilities give per-finding AUCs with percentile-bootstrap 95% CIs, set
beside the reference CheXNet predictions on the same images. Writes ``crossval.json`` and
``roc.png`` and regenerates ``MODEL_CARD.md`` (from ``manifest.json``) in ``--out``. The
shipped weights, ONNX graph, golden outputs and manifest are not touched.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engines.evaluation.folds import auc_summary, patient_folds
from engines.evaluation.metrics import auc, roc_curve

COMMAND = "python -m engines.demo.crossval --data ../shared/data/nih-cxr14-sample --folds 5 --out engines/bundles/demo"


def _present(row: dict[str, str]) -> set[str]:
    return set(row["findings"].split("|")) - {"No Finding"}


def chexnet_scores(data: Path, images: Sequence[str], columns: dict[str, str | None]) -> tuple[dict, dict]:
    """Reference CheXNet scores per bundle finding (None: max of its 14 probabilities) and all 14 raw."""
    with open(data / "reference_chexnet_predictions.csv", newline="") as f:
        by_image = {r["Image Index"]: r for r in csv.DictReader(f)}
    rows = [by_image[name] for name in images]
    raw = {k[len("prob_") :]: np.array([float(r[k]) for r in rows]) for k in rows[0] if k.startswith("prob_")}
    scores = {
        name: raw[col[len("prob_") :]] if col else np.max(np.stack(list(raw.values())), axis=0)
        for name, col in columns.items()
    }
    return scores, raw


def _log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    import torch

    from engines.demo import train as recipe
    from engines.preprocess import geometry, normalize

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="nih-cxr14-sample directory")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory (crossval.json, roc.png, card)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=120, help="per fold (the shipped model: 120)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--render-only", action="store_true", help="only redraw roc.png and the card")
    args = parser.parse_args(argv)
    if args.render_only:
        render(args.data, args.out)
        return
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out: Path = args.out

    rows, labels, aux, images = recipe.read_dataset(args.data)
    names = [f[0] for f in recipe.FINDINGS]
    strata = np.array([[s in _present(r) for s in recipe.STRATA] + [bool(_present(r))] for r in rows])
    folds = patient_folds([r["patient_id"] for r in rows], strata, args.folds, args.seed)
    targets = np.concatenate([labels, np.stack(list(aux.values()), axis=1)], axis=1)
    spec = {"size": list(recipe.SIZE), "resize": {"pad_value": 0.0}}
    boxed, _ = geometry([im / np.float32(255) for im in images], spec)
    _log(
        f"{len(rows)} images, {len({r['patient_id'] for r in rows})} patients, {args.folds} folds "
        f"of {[len(f) for f in folds]}; {args.epochs} epochs per fold",
        start,
    )

    oof = np.full(labels.shape, np.nan, dtype=np.float64)
    fold_info = []
    for k, test_idx in enumerate(folds):
        fold_start = time.perf_counter()
        train_idx = np.setdiff1d(np.arange(len(rows)), test_idx)
        x = boxed[train_idx]
        norm = {"scheme": "mean_std", "mean": round(float(x.mean()), 4), "std": round(float(x.std()), 4)}
        torch.manual_seed(args.seed)
        _log(f"fold {k + 1}/{args.folds}: training on {len(train_idx)}, scoring {len(test_idx)}", start)
        model = recipe.train_model(x, targets[train_idx], norm, args, start)
        with torch.no_grad():
            batch = torch.from_numpy(normalize(boxed[test_idx], norm)[:, None].astype(np.float32))
            _, logits, _ = model(batch)
        oof[test_idx] = torch.sigmoid(logits).double().numpy()
        fold_aucs = {
            n: round(auc(labels[test_idx, j], oof[test_idx, j]), 4)
            if 0 < labels[test_idx, j].sum() < len(test_idx)
            else None
            for j, n in enumerate(names)
        }
        seconds = time.perf_counter() - fold_start
        fold_info.append(
            {
                "fold": k + 1,
                "n_train": len(train_idx),
                "n_test": len(test_idx),
                "n_positive_test": {n: int(labels[test_idx, j].sum()) for j, n in enumerate(names)},
                "normalization": norm,
                "auc": fold_aucs,
                "seconds": round(seconds, 1),
            }
        )
        _log(
            f"fold {k + 1}/{args.folds} done in {seconds:.0f}s: "
            + ", ".join(f"{n} {a:.3f}" if a is not None else f"{n} n/a" for n, a in fold_aucs.items()),
            start,
        )
    assert not np.isnan(oof).any()

    chexnet, chexnet_all = chexnet_scores(args.data, [r["image"] for r in rows], recipe.CHEXNET_COLUMN)
    findings = {}
    for j, n in enumerate(names):
        y = labels[:, j]
        findings[n] = {**auc_summary(y, oof[:, j], seed=j)}
        ref = auc_summary(y, chexnet[n], seed=100 + j)
        findings[n]["chexnet_auc"] = ref["auc"]
        findings[n]["chexnet_auc_ci95"] = ref["auc_ci95"]
    all_labels = {n: np.array([n in _present(r) for r in rows]) for n in chexnet_all}
    chexnet14 = {n: round(auc(all_labels[n], s), 4) for n, s in chexnet_all.items() if 0 < all_labels[n].sum()}
    wall = time.perf_counter() - start
    result = {
        "command": " ".join(["python -m engines.demo.crossval", *(argv if argv is not None else sys.argv[1:])]),
        "method": (
            f"stratified patient-level {args.folds}-fold cross-validation (patients grouped by patient_id; "
            f"folds stratified on the combination of {', '.join(recipe.STRATA)} and abnormal) of the shipped "
            "model's training recipe (engines.demo.train.train_model); each image scored once by the fold model "
            "that did not train on it; AUCs over the pooled out-of-fold probabilities with percentile bootstrap "
            "95% CIs (2000 resamples)"
        ),
        "n_images": len(rows),
        "n_patients": len({r["patient_id"] for r in rows}),
        "folds": args.folds,
        "fold_sizes": [len(f) for f in folds],
        "epochs": args.epochs,
        "batch": args.batch,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "threads": args.threads,
        "wall_seconds": round(wall, 1),
        "findings": findings,
        "mean_auc": round(float(np.mean([f["auc"] for f in findings.values()])), 4),
        "chexnet_mean_auc": round(float(np.mean([f["chexnet_auc"] for f in findings.values()])), 4),
        "chexnet_note": (
            "Reference CheXNet predictions (reference_chexnet_predictions.csv) scored against labels.csv on the "
            "same images; for Abnormal (any finding vs 'No Finding') its score is the maximum of its 14 "
            "probabilities. CheXNet was trained on the full ChestX-ray14 training set, which may include "
            "these images."
        ),
        "chexnet_all_14": {"auc": chexnet14, "mean_auc": round(float(np.mean(list(chexnet14.values()))), 4)},
        "per_fold": fold_info,
        "out_of_fold": {
            "image": [r["image"] for r in rows],
            "fold": [int(next(k for k, f in enumerate(folds) if i in f)) + 1 for i in range(len(rows))],
            **{n: [round(float(v), 6) for v in oof[:, j]] for j, n in enumerate(names)},
        },
    }
    (out / "crossval.json").write_text(json.dumps(result, indent=2) + "\n")
    _log(f"wrote {out / 'crossval.json'}", start)
    for n, f in findings.items():
        _log(
            f"{n}: AUC {f['auc']:.3f} {f['auc_ci95']} ({f['n_positive']}/{f['n']} positive), "
            f"CheXNet {f['chexnet_auc']:.3f}",
            start,
        )
    _log(
        f"mean AUC {result['mean_auc']:.3f} (CheXNet {result['chexnet_mean_auc']:.3f}); "
        f"CheXNet mean over its 14 findings {result['chexnet_all_14']['mean_auc']:.3f}",
        start,
    )
    render(args.data, out)
    _log(f"wrote {out / 'roc.png'} and {out / 'MODEL_CARD.md'}", start)


def render(data: Path, out: Path) -> None:
    """Draw ``roc.png`` and regenerate ``MODEL_CARD.md`` in ``out`` from its crossval.json and manifest,
    then pin the bundle's files again."""
    from engines.demo import card
    from engines.demo import train as recipe
    from engines.pins import pin

    result = json.loads((out / "crossval.json").read_text())
    with open(data / "labels.csv", newline="") as f:
        by_image = {r["image"]: _present(r) for r in csv.DictReader(f)}
    oof = result["out_of_fold"]
    present = [by_image[name] for name in oof["image"]]
    chexnet, _ = chexnet_scores(data, oof["image"], recipe.CHEXNET_COLUMN)
    curves, reference = {}, {}
    for name, *_rest, positives in recipe.FINDINGS:
        y = np.array([bool(p & positives) if positives is not None else bool(p) for p in present])
        curves[name] = roc_curve(y, np.array(oof[name]))[:2]
        reference[name] = roc_curve(y, chexnet[name])[:2]
    findings = result["findings"]
    card.roc_plot(
        curves,
        {n: f["auc"] for n, f in findings.items()},
        out / "roc.png",
        reference=reference,
        reference_aucs={n: f["chexnet_auc"] for n, f in findings.items()},
        title=f"Demo model, {result['folds']}-fold cross-validated ROC (not for clinical use)",
    )
    card.write_card(out)
    pin(out)


if __name__ == "__main__":
    main()
