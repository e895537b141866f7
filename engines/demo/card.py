"""The demo bundle's model card (Markdown) and ROC plot (PNG, drawn with Pillow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]

CODE_NOTES = {
    "Cardiomegaly": (
        "SCT 8186001 'Cardiomegaly' (disorder). DICOM PS3.16 CIDs 12248/12249 (cardiac ultrasound "
        "summary codes) use SCT 287272002 for 'Cardiomegaly'; which concept a site prefers should be "
        "checked against its SNOMED CT release."
    ),
    "Effusion": (
        "SCT 60046008 'Pleural effusion', as in DICOM PS3.16 (CIDs 645, 8134); the NIH 'Effusion' label "
        "means pleural effusion."
    ),
    "Atelectasis": "SCT 46621007 'Atelectasis' (disorder); not checked against a SNOMED CT release here.",
    "Abnormal": (
        "SCT 263654008 'Abnormal' is a qualifier value (DICOM CIDs 222/242 normality codes), not a "
        "clinical finding: it labels the study-level triage output (any ChestX-ray14 finding vs 'No Finding')."
    ),
}


def _dashed(
    draw: ImageDraw.ImageDraw,
    points: list[tuple[float, float]],
    colour: str,
    dash: float = 6.0,
    gap: float = 4.0,
    width: int = 1,
) -> None:
    """Draw a polyline as dashes of ``dash`` pixels separated by ``gap`` pixels."""
    on, left = True, dash
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        length = float(np.hypot(x1 - x0, y1 - y0))
        t = 0.0
        while t < length:
            step = min(left, length - t)
            if on:
                f0, f1 = t / length, (t + step) / length
                draw.line(
                    [(x0 + (x1 - x0) * f0, y0 + (y1 - y0) * f0), (x0 + (x1 - x0) * f1, y0 + (y1 - y0) * f1)],
                    fill=colour,
                    width=width,
                )
            t += step
            left -= step
            if left <= 1e-9:
                on = not on
                left = dash if on else gap


def roc_plot(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    aucs: dict[str, float],
    path: Path,
    reference: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    reference_aucs: dict[str, float] | None = None,
    title: str = "Demo bundle, held-out ROC (not for clinical use)",
    reference_label: str = "CheXNet",
) -> None:
    """Write ROC curves (name -> (fpr, tpr)) with their AUCs as a PNG.

    ``reference`` curves (same names), if given, are drawn dashed in the same colour.
    """
    size, margin = 520, 56
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    span = size - 2 * margin

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return margin + fpr * span, size - margin - tpr * span

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for t in np.linspace(0, 1, 6):
        draw.text((xy(t, 0)[0] - 8, size - margin + 6), f"{t:.1f}", fill="black", font=font)
        draw.text((margin - 28, xy(0, t)[1] - 6), f"{t:.1f}", fill="black", font=font)
    for i in range(20):
        draw.line([xy(i / 20, i / 20), xy((i + 0.5) / 20, (i + 0.5) / 20)], fill="grey")
    n = len(curves)
    if reference is not None:
        for name, (rf, rt) in reference.items():
            colour = _COLOURS[list(curves).index(name) % len(_COLOURS)] if name in curves else "grey"
            _dashed(draw, [xy(f, t) for f, t in zip(rf, rt, strict=True)], colour)
    for i, (fpr, tpr) in enumerate(curves.values()):
        draw.line([xy(f, t) for f, t in zip(fpr, tpr, strict=True)], fill=_COLOURS[i % len(_COLOURS)], width=2)
    draw.rectangle([xy(0.28, 0.05 + 0.055 * n + 0.045), xy(0.99, 0.01)], fill="white", outline="lightgrey")
    for i, name in enumerate(curves):
        label = f"{name}  AUC {aucs[name]:.3f}"
        if reference_aucs is not None and name in reference_aucs:
            label += f"  ({reference_label} {reference_aucs[name]:.3f})"
        draw.text(xy(0.30, 0.05 + 0.055 * (n - i)), label, fill=_COLOURS[i % len(_COLOURS)], font=font)
    if reference is not None:
        draw.text(xy(0.30, 0.05), f"solid: this model; dashed: {reference_label}, same images", fill="black", font=font)
    draw.text((size / 2 - 40, size - margin + 24), "1 - specificity", fill="black", font=font)
    draw.text((8, margin - 24), "sensitivity", fill="black", font=font)
    draw.text((margin, 16), title, fill="black", font=font)
    image.save(path, optimize=True)


def write_card(bundle: Path) -> Path:
    """Regenerate ``bundle/MODEL_CARD.md`` from its manifest.json and, if present, crossval.json."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    cv_path = bundle / "crossval.json"
    crossval = json.loads(cv_path.read_text()) if cv_path.exists() else None
    path = bundle / "MODEL_CARD.md"
    path.write_text(model_card(manifest, crossval))
    return path


def _crossval_section(cv: dict[str, Any], training: dict[str, Any], held_out: dict[str, Any]) -> str:
    n_train_shipped = training["n_train"]
    same = [
        fold["fold"]
        for fold in cv["per_fold"]
        if fold["n_test"] == training["n_held_out"]
        and all(fold["auc"].get(n) == f["auc"] for n, f in held_out["findings"].items())
    ]
    reproduced = (
        f" Fold {same[0]} is the shipped model's own train/held-out split (the fold assignment uses the same seeded, "
        "stratified procedure), and its fold model reproduces the shipped model's held-out AUCs exactly: "
        "a check that the cross-validation runs the shipped recipe."
        if same
        else ""
    )
    rows = "\n".join(
        f"| {name} | {f['n_positive']} / {f['n']} | **{f['auc']:.3f}** ({f['auc_ci95'][0]:.2f}-{f['auc_ci95'][1]:.2f}) "
        f"| {f['chexnet_auc']:.3f} ({f['chexnet_auc_ci95'][0]:.2f}-{f['chexnet_auc_ci95'][1]:.2f}) |"
        for name, f in cv["findings"].items()
    )
    names = list(cv["findings"])
    folds = "\n".join(
        f"| {fold['fold']} | {fold['n_train']} / {fold['n_test']} | "
        + " | ".join(
            (f"{fold['auc'][n]:.3f}" if fold["auc"][n] is not None else "n/a") + f" ({fold['n_positive_test'][n]})"
            for n in names
        )
        + " |"
        for fold in cv["per_fold"]
    )
    c14 = cv["chexnet_all_14"]
    epochs_note = (
        ""
        if cv["epochs"] == training["epochs"]
        else f" **Note: {cv['epochs']} epochs per fold, not the shipped model's {training['epochs']}** (CPU time); "
        "with the shorter one-cycle schedule the fold models are less trained, so these figures likely understate "
        "the shipped recipe."
    )
    sizes = ", ".join(map(str, cv["fold_sizes"]))
    n_train = "/".join(sorted({str(f["n_train"]) for f in cv["per_fold"]}))
    minutes = cv["wall_seconds"] / 60
    return f"""## Cross-validated evaluation (primary)
The shipped model's training recipe (`engines/demo/train.py`: same architecture, input path,
augmentation, loss, optimizer, auxiliary targets; {cv["epochs"]} epochs, batch {cv["batch"]}, seed {cv["seed"]})
was re-run in **{cv["folds"]}-fold stratified, patient-level cross-validation** over all
{cv["n_images"]} images ({cv["n_patients"]} patients; folds of {sizes} images; each fold
model trained on the other {n_train}, the shipped model on {n_train_shipped}). Every image was scored once, by
the fold model that never saw it; the AUCs below are over the pooled out-of-fold
probabilities, with percentile-bootstrap 95% CIs (2000 resamples). The reference CheXNet
column scores the published CheXNet predictions (`reference_chexnet_predictions.csv`) against
the same labels on the same {cv["n_images"]} images.{epochs_note}

| Finding | positives / n | AUC, cross-validated (95% CI) | CheXNet AUC, same images (95% CI) |
|---|---|---|---|
{rows}
| **Mean** | | **{cv["mean_auc"]:.3f}** | {cv["chexnet_mean_auc"]:.3f} |

Mean cross-validated AUC over the {len(names)} outputs: **{cv["mean_auc"]:.3f}**; the reference
CheXNet on the same images: {cv["chexnet_mean_auc"]:.3f} (over all 14 of its findings:
{c14["mean_auc"]:.3f}). For Abnormal (any ChestX-ray14 finding vs 'No Finding') the CheXNet score
is the maximum of its 14 probabilities, since it has no such output. CheXNet is a
DenseNet-121 trained on the full ChestX-ray14 training set (about 100,000 images, possibly
including some of these), so it is a reference, not a fair competitor.

The curves of `roc.png` are these out-of-fold predictions (solid) with CheXNet on the same
images (dashed):

![Cross-validated ROC curves, CheXNet dashed](roc.png)

Per fold (AUC on the fold's own images, positives in brackets; small folds, so noisy):

| Fold | train / test | {" | ".join(names)} |
|---|---|{"---|" * len(names)}
{folds}

Caveats: each fold model is trained afresh (the shipped model was trained once, on the
fixed 80% split below); cross-validation estimates how well this *recipe* does on images
it was not trained on.{reproduced} The recipe was chosen on an inner split of the shipped model's
training part, i.e. on images that also appear in these folds, so the estimate may be
slightly optimistic. Reproduce: `{cv["command"]}` ({minutes:.0f} min wall time on {cv["threads"]}
shared CPU threads); all figures, fold assignments and out-of-fold probabilities are in
`crossval.json`.

"""


def model_card(manifest: dict[str, Any], crossval: dict[str, Any] | None = None) -> str:
    """The bundle's MODEL_CARD.md, from its final manifest (and cross-validation results, if any)."""
    ev, tr, inp = manifest["evaluation"], manifest["training"], manifest["input"]
    cv_section = _crossval_section(crossval, tr, ev) if crossval is not None else ""
    held_title = (
        "Held-out evaluation of the shipped model (secondary)" if crossval is not None else "Held-out evaluation"
    )
    held_intro = (
        f"The shipped weights scored on their own {tr['n_held_out']} held-out images, the split that also set the "
        "operating thresholds. Fewer than 20 positives per finding: read the cross-validated table above first.\n"
        if crossval is not None
        else ""
    )
    cv_reproduce = (
        f"\nCross-validation (does not touch the shipped weights; rewrites crossval.json, roc.png and this card): "
        f"`{crossval['command']}`."
        if crossval is not None
        else ""
    )
    held_roc = "" if crossval is not None else "\n![Held-out ROC curves](roc.png)\n"
    rows = "\n".join(
        f"| {name} | {f['n_positive']} / {f['n']} | {f['auc']:.3f} ({f['auc_ci95'][0]:.2f}-{f['auc_ci95'][1]:.2f}) "
        f"| {f['chexnet_auc_same_images']:.3f} | {f['threshold']:.3f} "
        f"| {f['sensitivity']:.2f} / {f['specificity']:.2f} |"
        for name, f in ev["findings"].items()
    )
    codes = "\n".join(
        f"- **{f['name']}**: {CODE_NOTES.get(f['name'], f['code']['scheme'] + ' ' + f['code']['value'])}"
        for f in manifest["findings"]
    )
    dropped = "\n".join(f"- **{name}**: {why}" for name, why in tr["dropped_findings"].items()) or "None."
    chexnet_mean = np.mean([f["chexnet_auc_same_images"] for f in ev["findings"].values()])
    norm = inp["normalization"]
    stride = manifest["outputs"]["map"]["feature_stride"]
    grid = inp["size"][0] // stride
    tolerance = ", ".join(f"{k} {v:g}" for k, v in manifest["parity"]["tolerance"]["fp32"].items())
    return f"""# Model card: `{manifest["name"]}` {manifest["version"]}

> **Demonstration model. NOT FOR CLINICAL USE.** It is a small network trained in a few
> minutes on {tr["n_train"]} images, so that Pleura can be installed and tried end to end without
> downloading a model. Its outputs must not inform any diagnosis.

## What it is
A small convolutional network (ChestX-ray8 style: a convolutional encoder, a
global-average-pooled {manifest["outputs"]["embedding_dim"]}-d embedding, one linear logistic head
per finding, class activation maps = final feature map x head weights), {tr["parameters"]:,}
parameters, trained from scratch (no pretraining) with `engines/demo/train.py`.
Architecture: `{manifest["architecture"]}`.

Outputs per image: a probability per finding, the embedding, and a
{manifest["outputs"]["map"]["size"][0]}x{manifest["outputs"]["map"]["size"][1]} localization map per
finding covering the whole image (CAM on the {grid}x{grid} feature grid, output stride
{stride}, sampled over the image's extent; values are the sigmoid of the local logit).

## Intended use
Software testing and demonstration of a DICOM AI pipeline on adult frontal chest
radiographs (CR/DX, PA or AP, age >= 18). Not for triage, diagnosis or any patient care.

## Training data
{manifest["source"]["training_data"]}. Labels are the dataset's report-mined
(NLP) labels, known to be noisy. One image per patient, so the split is patient-level:
{tr["n_train"]} training and {tr["n_held_out"]} held-out images ({ev["split"]}). The held-out images were
used neither for training nor for choosing the training recipe ({tr["model_selection"]}); they
were used to choose the operating thresholds (Youden's J), so the sensitivity/specificity
below are optimistic. The training set includes a few patients under 18.

Training: {tr["epochs"]} epochs, batch {tr["batch"]}, {tr["optimizer"]}; {tr["loss"]};
augmentation: {tr["augmentation"]}. Auxiliary targets during training (heads dropped before
export): {", ".join(tr["auxiliary_targets"])}.

## Preprocessing (identical in training and inference)
Input: MONOCHROME2 pixels scaled to [0, 1] (the training PNGs divided by 255). {inp["resize"]["description"]}
Model input {inp["size"][0]}x{inp["size"][1]}, normalized as (x - {norm["mean"]}) / {norm["std"]}.

{cv_section}## {held_title}
{held_intro}
| Finding | positives / n | AUC (95% bootstrap CI) | CheXNet AUC, same images | threshold | sens / spec at threshold |
|---|---|---|---|---|---|
{rows}

Mean AUC over the {len(ev["findings"])} outputs: **{ev["mean_auc"]:.3f}** (reference CheXNet on the same images:
{chexnet_mean:.3f}). {ev["chexnet_note"]} For comparison, over all 490 sample images the
reference CheXNet's AUCs are Cardiomegaly 0.904 and Effusion 0.863 (data README).

With this few positives the confidence intervals are wide; differences of several points
of AUC between findings are not meaningful.
{held_roc}
## Codes
{codes}

## Findings not offered
{dropped}

## Limitations
- Trained from scratch on 392 images: far below the data such models need; expect poor
  calibration and poor generalization to other hospitals, devices and populations.
- NIH ChestX-ray14 labels are mined from reports and noisy. Abnormal is positive for any of
  the 14 labels, including ones the model has no dedicated head for.
- Localization maps are coarse class activation maps from a weakly supervised model; they
  show where the evidence for a score lies, not lesion boundaries.
- Not evaluated on lateral views, children, portable/ICU images with devices, or DICOM
  images from other pipelines; the 512x512 training PNGs were 8-bit.

## Reproduce and verify
`{manifest["source"]["built_by"]}` (CPU, a few minutes).{cv_reproduce}
Before any backend serves, its outputs on `golden.npz` must match the reference within the
manifest's tolerance (max absolute difference, fp32: {tolerance}).

## Licence and attribution
{manifest["licence"]}.

{manifest["source"]["attribution"]}
"""
