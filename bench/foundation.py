"""Must-show 1 of issue 6: data-efficiency curves and image-to-image search precision on the NIH sample.

    .venv/bin/python -m bench.foundation [--data ../shared/data/nih-cxr14-sample] [--out bench/results]

With the demo bundle's embeddings of the 490 NIH ChestX-ray14 sample images:

- **Data-efficiency curves** for Cardiomegaly and Effusion (:func:`engines.heads.learning_curve`):
  AUC of an L2 logistic head against the number of labelled images (10, 25, 50, 100, 200, all),
  (a) under stratified patient-level 5-fold cross-validation over all 490 images, and (b) trained
  on draws from the 392 images the demo encoder was trained on and tested on the 98 it held out.
  The encoder was trained with these two labels on those 392 images, so (a) is optimistic;
  (b) is the honest figure.
- **Search precision@10**: for each query image, its 10 nearest neighbours by cosine similarity
  of L2-normalised embeddings among all other images of other patients; per finding, the mean
  fraction of neighbours with the finding over queries with it, against chance (the finding's
  prevalence among each query's candidates), for all queries and for the 98 held-out ones, and
  the same search over 32x32 pixel thumbnails as a no-model baseline.

Writes ``foundation.json``, ``foundation-curve-Cardiomegaly.png``, ``foundation-curve-Effusion.png``
and ``foundation-search.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from engines.demo.train import split
from engines.heads import learning_curve
from engines.heads.plots import _pyplot, curve_png
from worker.heads.labelled import embed, read_image, read_labels
from worker.settings import load_settings

CURVE_FINDINGS = ("Cardiomegaly", "Effusion")
SIZES = (10, 25, 50, 100, 200, sys.maxsize)
MIN_POSITIVES = 10
K = 10


def precision_at_k(vectors: np.ndarray, labels: np.ndarray, patients: np.ndarray, queries: np.ndarray,
                   k: int = K, seed: int = 0) -> dict:
    """Same-finding precision@k of cosine search (query and its patient's images excluded) against chance."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    sims = unit[queries] @ unit.T
    sims[patients[queries][:, None] == patients[None, :]] = -np.inf  # the query itself and same-patient images
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    hits = labels[top].mean(axis=1)
    candidates = patients[queries][:, None] != patients[None, :]
    chance = (candidates & labels[None, :]).sum(axis=1) / candidates.sum(axis=1)
    mine = labels[queries]
    p, c = hits[mine], chance[mine]
    rng = np.random.default_rng(seed)
    boot = [p[rng.integers(0, len(p), len(p))].mean() for _ in range(1000)]
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"queries": int(mine.sum()), "precision": round(float(p.mean()), 4),
            "precision_ci95": [round(float(lo), 4), round(float(hi), 4)], "chance": round(float(c.mean()), 4),
            "lift": round(float(p.mean() / c.mean()), 2)}


def thumbnails(paths: list[Path], size: int = 32) -> np.ndarray:
    """Centred, per-image standardised 32x32 thumbnails (the no-model search baseline)."""
    from PIL import Image

    out = []
    for path in paths:
        small = np.asarray(Image.fromarray((read_image(path) * 255).astype(np.uint8)).resize((size, size),
                                                                                             Image.BILINEAR))
        v = small.astype(np.float64).ravel()
        out.append((v - v.mean()) / max(v.std(), 1e-6))
    return np.stack(out)


def search_png(search: dict, path: Path) -> None:
    plt = _pyplot()
    names = list(search["embedding_all_queries"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8.5, 4.4), dpi=110)
    for i, (key, label) in enumerate((("embedding_all_queries", "demo embedding, all queries"),
                                      ("embedding_held_out_queries", "demo embedding, 98 held-out queries"),
                                      ("pixels_all_queries", "32x32 pixels, all queries"))):
        vals = [search[key].get(n, {}).get("precision", np.nan) for n in names]
        ax.bar(x + (i - 1) * 0.27, vals, 0.27, label=label)
    ax.scatter(x, [search["embedding_all_queries"][n]["chance"] for n in names], marker="_", s=400, color="black",
               zorder=3, label="chance (prevalence)")
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set(ylabel="same-finding precision@10", title="Image-to-image search on the NIH sample (other patients only)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cxr14-sample"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--cache", type=Path, default=Path("build/foundation/embeddings.npz"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    table = read_labels(args.data / "labels.csv", args.data / "images")
    bundle, x, _ = embed(load_settings(None), "demo", "auto", table, args.cache)
    patients = np.array(table.patients)
    encoder_train, held_out = split(table.rows, bundle.manifest["training"]["n_held_out"] / len(table.rows),
                                    bundle.manifest["training"]["split_seed"])
    assert len(held_out) == bundle.manifest["training"]["n_held_out"], "not the demo bundle's held-out split"

    curves = {}
    for finding in CURVE_FINDINGS:
        y = table.labels(finding)
        cv_all = learning_curve(x, y, patients, SIZES, repeats=args.repeats, k=5, seed=args.seed)
        held = learning_curve(x, y, patients, SIZES, repeats=args.repeats * 5, seed=args.seed,
                              splits=[(encoder_train, held_out)])
        reference = bundle.manifest["evaluation"]["findings"][finding]["auc"]
        curves[finding] = {"cv_all_490": cv_all, "held_out_98": held, "bundle_head_held_out_auc": reference}
        curve_png({"5-fold CV over all 490 (encoder trained on 392 of them: optimistic)": cv_all,
                   "trained on encoder-training images, tested on the 98 held out": held},
                  args.out / f"foundation-curve-{finding}.png",
                  f"{finding}: logistic head on demo {bundle.version} embeddings",
                  references={f"demo bundle's own head, 98 held out ({reference:.3f})": reference})
        print(f"[{time.perf_counter() - start:6.1f}s] {finding}: " + "; ".join(
            f"n={p['n_labelled_mean']:g} CV {p['auc_mean']:.3f} held-out {q['auc_mean']:.3f}"
            for p, q in zip(cv_all["points"], held["points"], strict=True)), flush=True)

    pixels = thumbnails(table.paths)
    names = sorted({f for r in table.rows for f in r["findings"].split("|")})
    search: dict[str, dict] = {"embedding_all_queries": {}, "embedding_held_out_queries": {}, "pixels_all_queries": {}}
    everyone = np.arange(len(patients))
    for name in names:
        y = np.array([name in r["findings"].split("|") for r in table.rows])
        if y.sum() < MIN_POSITIVES:
            continue
        search["embedding_all_queries"][name] = precision_at_k(x, y, patients, everyone)
        if y[held_out].sum() >= 3:
            search["embedding_held_out_queries"][name] = precision_at_k(x, y, patients, held_out)
        search["pixels_all_queries"][name] = precision_at_k(pixels, y, patients, everyone)
    search_png(search, args.out / "foundation-search.png")

    result = {
        "command": "python -m bench.foundation " + " ".join(argv if argv is not None else sys.argv[1:]),
        "bundle": {"name": bundle.name, "version": bundle.version, "model_sha256": bundle.model_sha256,
                   "embedding_dim": int(x.shape[1])},
        "data": {"images": len(table.names), "patients": len(set(table.patients)),
                 "encoder_training_images": len(encoder_train), "encoder_held_out_images": len(held_out)},
        "curves": curves,
        "search": {"k": K, "min_positives": MIN_POSITIVES,
                   "method": ("cosine similarity of L2-normalised vectors; query and same-patient images excluded; "
                              "precision = mean fraction of the 10 neighbours with the query's finding over the "
                              "queries that have it; chance = mean prevalence of the finding among each query's "
                              "candidates; 95% CI: bootstrap over queries (1000)"),
                   **search},
        "caveat": ("The demo encoder (0.4 M parameters, trained from scratch) was trained on 392 of these 490 images "
                   "with their ChestX-ray14 labels (Cardiomegaly, Effusion, Atelectasis, Abnormal as outputs, the "
                   "other labels as auxiliary targets): figures over all images are optimistic; the held-out "
                   "ones are not."),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "foundation.json").write_text(json.dumps(result, indent=2) + "\n")
    for name, s in search["embedding_all_queries"].items():
        h = search["embedding_held_out_queries"].get(name)
        print(f"{name:<20} P@10 {s['precision']:.3f} (chance {s['chance']:.3f}, x{s['lift']})"
              + (f"  held-out {h['precision']:.3f}" if h else "")
              + f"  pixels {search['pixels_all_queries'][name]['precision']:.3f}")
    print(f"[{time.perf_counter() - start:6.1f}s] wrote {args.out / 'foundation.json'} and 3 PNGs")


if __name__ == "__main__":
    main()
