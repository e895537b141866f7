"""The demo bundle's model card (Markdown) and ROC plot (PNG, drawn with Pillow)."""

from __future__ import annotations

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


def roc_plot(curves: dict[str, tuple[np.ndarray, np.ndarray]], aucs: dict[str, float], path: Path) -> None:
    """Write ROC curves (name -> (fpr, tpr)) with their AUCs as a PNG."""
    size, margin = 480, 56
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
    for i, (name, (fpr, tpr)) in enumerate(curves.items()):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [xy(f, t) for f, t in zip(fpr, tpr, strict=True)]
        draw.line(points, fill=colour, width=2)
        legend = xy(0.45, 0.05 + 0.06 * (len(curves) - 1 - i))
        draw.text(legend, f"{name}  AUC {aucs[name]:.3f}", fill=colour, font=font)
    draw.text((size / 2 - 40, size - margin + 24), "1 - specificity", fill="black", font=font)
    draw.text((8, margin - 24), "sensitivity", fill="black", font=font)
    draw.text((margin, 16), "Demo bundle, held-out ROC (not for clinical use)", fill="black", font=font)
    image.save(path, optimize=True)


def model_card(manifest: dict[str, Any]) -> str:
    """The bundle's MODEL_CARD.md, from its final manifest."""
    ev, tr, inp = manifest["evaluation"], manifest["training"], manifest["input"]
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

## Held-out evaluation
| Finding | positives / n | AUC (95% bootstrap CI) | CheXNet AUC, same images | threshold | sens / spec at threshold |
|---|---|---|---|---|---|
{rows}

Mean AUC over the {len(ev["findings"])} outputs: **{ev["mean_auc"]:.3f}** (reference CheXNet on the same images:
{chexnet_mean:.3f}). {ev["chexnet_note"]} For comparison, over all 490 sample images the
reference CheXNet's AUCs are Cardiomegaly 0.904 and Effusion 0.863 (data README).

With this few positives the confidence intervals are wide; differences of several points
of AUC between findings are not meaningful.

![Held-out ROC curves](roc.png)

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
`{manifest["source"]["built_by"]}` (CPU, a few minutes).
Before any backend serves, its outputs on `golden.npz` must match the reference within the
manifest's tolerance (max absolute difference, fp32: {tolerance}).

## Licence and attribution
{manifest["licence"]}.

{manifest["source"]["attribution"]}
"""
