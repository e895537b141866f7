"""Train the built-in ``demo`` bundle on the NIH ChestX-ray14 sample, evaluate it, write the bundle.

    python -m engines.demo.train --data ../shared/data/nih-cxr14-sample --out engines/bundles/demo

Images go through exactly the inference path: PNG / 255 -> :func:`engines.preprocess.geometry`
(letterbox) -> :func:`engines.preprocess.normalize`; augmentation acts on the letterboxed
[0, 1] image. The split is patient-level (one image per patient in the sample), seeded and
stratified on the combination of the common labels. The held-out part is never used for
training or model selection: only for the reported AUCs and for choosing the operating
thresholds. The other ChestX-ray14 labels (Infiltration among them, see :data:`DROPPED`) are
auxiliary training targets whose heads are dropped before export. Runs on CPU in about 3 min.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from engines.architectures import build
from engines.bundle import SCHEMA_VERSION
from engines.demo import card
from engines.evaluation.metrics import auc, bootstrap_auc_ci, roc_curve, youden_threshold
from engines.importers.writer import ADULT_FRONTAL_CHEST, synthetic_inputs, write_bundle, write_manifest
from engines.preprocess import geometry, normalize, resize
from engines.runtime import load

NAME, VERSION = "demo", "0.1.0"
BUILD_COMMAND = "python -m engines.demo.train --data ../shared/data/nih-cxr14-sample --out engines/bundles/demo"

#: (name, SNOMED CT code, code meaning, NIH labels that make it positive; None = any finding).
FINDINGS: list[tuple[str, str, str, frozenset[str] | None]] = [
    ("Cardiomegaly", "8186001", "Cardiomegaly", frozenset({"Cardiomegaly"})),
    ("Effusion", "60046008", "Pleural effusion", frozenset({"Effusion"})),
    ("Atelectasis", "46621007", "Atelectasis", frozenset({"Atelectasis"})),
    ("Abnormal", "263654008", "Abnormal", None),
]
#: The split is stratified on these labels' combination (with abnormal vs "No Finding").
STRATA = ("Cardiomegaly", "Effusion", "Atelectasis", "Infiltration")
#: Findings trained for but not offered, and why (they remain auxiliary training targets).
DROPPED = {
    "Infiltration": (
        "not learnable here: AUC 0.48-0.55 on the inner validation split in every configuration tried; on the "
        "held-out split 0.535 (95% CI 0.38-0.67, 20 positives) with the final recipe (0.59 with an earlier one), "
        "seen before deciding to drop it. The NIH label is also the least well defined. It would have been coded "
        "SCT 409609008 'Radiologic infiltrate of lung'."
    )
}
#: Column of the reference CheXNet predictions compared with each finding (None: max over all 14).
CHEXNET_COLUMN = {
    "Cardiomegaly": "prob_Cardiomegaly",
    "Effusion": "prob_Effusion",
    "Atelectasis": "prob_Atelectasis",
    "Abnormal": None,
}

ARCHITECTURE = {"name": "cam_cnn", "widths": [16, 32, 64, 96, 160], "dropout": 0.3}
SIZE = (128, 128)
MAP_SIZE = [32, 32]
TOLERANCE = {
    "fp32": {"embeddings": 1e-4, "probabilities": 1e-4, "maps": 1e-4},
    "fp16": {"embeddings": 5e-2, "probabilities": 1e-2, "maps": 2e-2},
}


def _log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)


def read_dataset(data: Path) -> tuple[list[dict[str, str]], np.ndarray, dict[str, np.ndarray], list[np.ndarray]]:
    """Rows of labels.csv, the (N, F) label matrix, auxiliary labels by name, uint8 images."""
    with open(data / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    present = [set(row["findings"].split("|")) - {"No Finding"} for row in rows]
    labels = np.array(
        [[bool(p & pos) if pos is not None else bool(p) for *_, pos in FINDINGS] for p in present], np.float32
    )
    main = set().union(*(pos for *_, pos in FINDINGS if pos is not None))
    aux = {name: np.array([name in p for p in present], np.float32) for name in sorted(set().union(*present) - main)}
    images = []
    for row in rows:
        with Image.open(data / "images" / row["image"]) as im:
            images.append(np.asarray(im if im.mode == "L" else im.convert("L")))
    return rows, labels, aux, images


def split(rows: list[dict[str, str]], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split stratified on :data:`STRATA` and abnormality: (train indices, held-out indices)."""
    present = [set(row["findings"].split("|")) - {"No Finding"} for row in rows]
    strata = np.array([[name in p for name in STRATA] + [bool(p)] for p in present], np.float64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    keys = strata[order] @ (2.0 ** np.arange(strata.shape[1]))
    order = order[np.argsort(keys, kind="stable")]
    step = round(1 / fraction)
    held = np.sort(order[rng.integers(step) :: step])
    return np.setdiff1d(np.arange(len(rows)), held), held


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Augment letterboxed [0, 1] images (B, H, W): intensity, then a small affine (no flips)."""
    b = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    gamma, contrast, shift = uniform(0.7, 1.4), uniform(0.8, 1.2), uniform(-0.08, 0.08)
    x = x.clamp_min(1e-6) ** gamma[:, None, None]
    x = ((x - 0.5) * contrast[:, None, None] + 0.5 + shift[:, None, None]).clamp(0.0, 1.0)
    angle, scale = uniform(-10, 10) * math.pi / 180, uniform(0.85, 1.15)
    tx, ty = uniform(-0.08, 0.08), uniform(-0.08, 0.08)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, [b, 1, *x.shape[1:]], align_corners=False)
    return F.grid_sample(x[:, None], grid, padding_mode="zeros", align_corners=False)[:, 0]


def train_model(
    x: np.ndarray, y: np.ndarray, norm: dict[str, Any], args: argparse.Namespace, start: float
) -> torch.nn.Module:
    """Fit the architecture on letterboxed images ``x`` (N, H, W) with labels ``y`` (N, F + aux).

    Returns the model with only the first ``len(FINDINGS)`` heads (auxiliary heads dropped).
    """
    gen = torch.Generator().manual_seed(args.seed)
    model = build(ARCHITECTURE, num_findings=y.shape[1])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    prevalence = yt.mean(0).clamp_min(1.0 / len(yt))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(1 - prevalence) / prevalence)
    steps = len(x) // args.batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps, pct_start=0.15
    )
    for epoch in range(args.epochs):
        model.train()
        perm, total = torch.randperm(len(x), generator=gen), 0.0
        for step in range(steps):
            idx = perm[step * args.batch : (step + 1) * args.batch]
            batch = normalize(augment(xt[idx], gen), norm)[:, None]
            _, logits, _ = model(batch)
            loss = loss_fn(logits, yt[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        if (epoch + 1) % 10 == 0 or epoch == 0:
            _log(f"epoch {epoch + 1}/{args.epochs} loss {total / steps:.4f}", start)
    final = build(ARCHITECTURE, num_findings=len(FINDINGS))
    state = model.state_dict()
    for key in ("head.weight", "head.bias"):
        state[key] = state[key][: len(FINDINGS)]
    final.load_state_dict(state)
    return final.eval()


def golden_inputs(mean_image: np.ndarray, seed: int) -> list[np.ndarray]:
    """Four non-patient images of varied sizes and aspects for the parity gate.

    The average of all training images (no single patient), then :func:`synthetic_inputs`.
    """
    return [np.clip(resize(mean_image, 180, 164), 0.0, 1.0).astype(np.float32), *synthetic_inputs(seed)]


def manifest(
    norm: dict[str, Any],
    thresholds: dict[str, float],
    evaluation: dict[str, Any] | None,
    training: dict[str, Any],
    embedding_dim: int,
    stride: int,
) -> dict[str, Any]:
    """The bundle manifest; :func:`engines.importers.writer.write_manifest` fills ``files`` and ``pins``."""
    return {
        "schema_version": SCHEMA_VERSION,
        "name": NAME,
        "version": VERSION,
        "description": (
            f"Small demonstration CNN ({training['parameters'] / 1e6:.2f} M parameters) trained from scratch on "
            f"{training['n_train']} NIH ChestX-ray14 images; per-finding probabilities, a {embedding_dim}-d "
            "embedding and class activation maps. NOT FOR CLINICAL USE: it exists to exercise Pleura end to "
            "end. See MODEL_CARD.md."
        ),
        "licence": (
            "Apache-2.0 (weights and code); training data NIH ChestX-ray14 (no use restrictions, attribution required)"
        ),
        "source": {
            "training_data": (
                "NIH ChestX-ray14, 490-image sample downsampled to 512x512 (../shared/data/nih-cxr14-sample)"
            ),
            "attribution": (
                "Images provided by the NIH Clinical Center. Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. "
                "ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised "
                "Classification and Localization of Common Thorax Diseases. CVPR 2017."
            ),
            "built_by": BUILD_COMMAND,
        },
        "intended_use": dict(ADULT_FRONTAL_CHEST),
        "input": {
            "size": list(SIZE),
            "channels": 1,
            "photometric_interpretation": "MONOCHROME2",
            "pixel_range": [0.0, 1.0],
            "resize": {
                "policy": "letterbox",
                "pad_value": 0.0,
                "filter": "separable antialiased tent filter (bilinear when enlarging)",
                "description": (
                    "The whole image is scaled to fit input.size with its aspect ratio kept, centred, "
                    "and the rest filled with pad_value (black) before normalization; nothing is cropped."
                ),
            },
            "normalization": norm,
        },
        "architecture": ARCHITECTURE,
        "outputs": {
            "embedding_dim": embedding_dim,
            "probabilities": "sigmoid of one linear head per finding on the embedding",
            "map": {
                "method": "CAM (final feature map x head weights + bias)",
                "feature_stride": stride,
                "size": MAP_SIZE,
                "description": (
                    "Per finding, sigmoid of the local logit bilinearly sampled over the original "
                    "image's extent (padding excluded): map[0, 0] is the image's top-left corner, "
                    "the map spans the whole image; the mean local logit equals the image logit."
                ),
            },
        },
        "findings": [
            {
                "name": name,
                "code": {"value": code, "scheme": "SCT", "meaning": meaning},
                "threshold": float(thresholds[name]),
                **({"triage": True} if name == "Effusion" else {}),  # flags the worklist (worker.notify)
                "threshold_rule": "Youden's J on the held-out split",
                "label_source": "NIH ChestX-ray14 label " + (repr(name) if positives else "other than 'No Finding'"),
            }
            for name, code, meaning, positives in FINDINGS
        ],
        "parity": {
            "tolerance": TOLERANCE,
            "description": (
                "Max absolute difference from golden.npz per output. A backend may run at a precision "
                "only if a tolerance is stated for it."
            ),
        },
        "training": training,
        "evaluation": evaluation,
    }


def evaluate(probs: np.ndarray, labels: np.ndarray, chexnet: dict[str, np.ndarray]) -> dict[str, Any]:
    """Held-out AUC (bootstrap 95% CI), Youden threshold and the reference CheXNet AUC per finding."""
    per_finding = {}
    for j, (name, *_rest) in enumerate(FINDINGS):
        y, p = labels[:, j].astype(bool), probs[:, j]
        lo, hi = bootstrap_auc_ci(y, p, seed=j)
        threshold, sens, spec = youden_threshold(y, p)
        per_finding[name] = {
            "n_positive": int(y.sum()),
            "n": len(y),
            "auc": round(auc(y, p), 4),
            "auc_ci95": [round(lo, 4), round(hi, 4)],
            "threshold": threshold,
            "sensitivity": round(sens, 4),
            "specificity": round(spec, 4),
            "chexnet_auc_same_images": round(auc(y, chexnet[name]), 4),
        }
    return {
        "split": (
            "held-out 20%, patient-level (one image per patient), seeded, stratified on the combination of "
            "Cardiomegaly, Effusion, Atelectasis, Infiltration and abnormal"
        ),
        "findings": per_finding,
        "mean_auc": round(float(np.mean([v["auc"] for v in per_finding.values()])), 4),
        "chexnet_note": (
            "Reference CheXNet (DenseNet-121 trained on the full ChestX-ray14 training set) scored on the "
            "same held-out images; for Abnormal its score is the maximum of its 14 probabilities."
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="nih-cxr14-sample directory")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    rows, labels, aux, images = read_dataset(args.data)
    train_idx, held_idx = split(rows, args.holdout, args.seed)
    _log(f"{len(rows)} images: {len(train_idx)} train, {len(held_idx)} held out", start)
    spec = {"size": list(SIZE), "resize": {"pad_value": 0.0}}
    boxed, _ = geometry([images[i] / np.float32(255) for i in train_idx], spec)
    norm = {"scheme": "mean_std", "mean": round(float(boxed.mean()), 4), "std": round(float(boxed.std()), 4)}
    targets = np.concatenate([labels, np.stack(list(aux.values()), axis=1)], axis=1)[train_idx]
    model = train_model(boxed, targets, norm, args, start)

    training = {
        "split_seed": args.seed,
        "n_train": len(train_idx),
        "n_held_out": len(held_idx),
        "epochs": args.epochs,
        "batch": args.batch,
        "optimizer": f"AdamW lr {args.lr} one-cycle, weight decay {args.weight_decay}",
        "loss": "binary cross-entropy, positives weighted by negatives/positives per finding",
        "auxiliary_targets": list(aux),
        "dropped_findings": DROPPED,
        "augmentation": "gamma 0.7-1.4, contrast 0.8-1.2, brightness +-0.08, rotation +-10 deg, scale 0.85-1.15, "
        "shift +-8%, no flips",
        "model_selection": (
            "recipe (input size, epochs, regularization, augmentation, auxiliary targets) chosen among a few "
            "configurations by AUC on an inner 25% validation split of the training part; the held-out split "
            "was scored three times during development (an earlier recipe, the final recipe with Infiltration, "
            "this bundle), never to pick the recipe"
        ),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    embedding_dim, stride = ARCHITECTURE["widths"][-1], model.stride
    provisional = manifest(norm, {n: 0.5 for n, *_ in FINDINGS}, None, training, embedding_dim, stride)
    goldens = golden_inputs(boxed.mean(axis=0), args.seed)
    write_bundle(out, model=model, manifest=provisional, golden_inputs=goldens, progress=lambda m: _log(m, start))
    engine = load(out, backend="onnxruntime")

    probs = engine.infer([images[i] / np.float32(255) for i in held_idx]).probabilities
    with open(args.data / "reference_chexnet_predictions.csv", newline="") as f:
        chex_rows = {r["Image Index"]: r for r in csv.DictReader(f)}
    held_rows = [chex_rows[rows[i]["image"]] for i in held_idx]
    chexnet = {
        name: np.array(
            [float(r[col]) if col else max(float(v) for k, v in r.items() if k.startswith("prob_")) for r in held_rows]
        )
        for name, col in CHEXNET_COLUMN.items()
    }
    evaluation = evaluate(probs, labels[held_idx], chexnet)
    thresholds = {name: v["threshold"] for name, v in evaluation["findings"].items()}
    for name, v in evaluation["findings"].items():
        _log(
            f"{name}: AUC {v['auc']:.3f} {v['auc_ci95']} ({v['n_positive']}/{v['n']} positive), "
            f"CheXNet {v['chexnet_auc_same_images']:.3f}, threshold {v['threshold']:.4f}",
            start,
        )
    final = manifest(norm, thresholds, evaluation, training, embedding_dim, stride)
    curves = {name: roc_curve(labels[held_idx, j], probs[:, j])[:2] for j, (name, *_r) in enumerate(FINDINGS)}
    card.roc_plot(curves, {n: v["auc"] for n, v in evaluation["findings"].items()}, out / "roc.png")
    write_manifest(out, final, card.model_card(final))
    for backend in ("onnxruntime", "torch"):
        _log(f"verified {load(out, backend=backend).backend}", start)
    _log(f"bundle written to {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.2f} MB)", start)
    _log("the card now shows held-out figures only; run `python -m engines.demo.crossval` for the "
         "cross-validated ones of this recipe", start)


if __name__ == "__main__":
    main()
