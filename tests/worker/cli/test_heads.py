"""`pleura eval` and `pleura heads train|curve` on 60 real NIH images with the demo bundle."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from engines.heads import head_probabilities, read_head
from worker.cli.heads import register
from worker.heads.labelled import CACHE
from worker.settings import load_settings


def pleura(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="pleura")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(load_settings(None), args)


@pytest.fixture
def subset(nih: Path, tmp_path: Path) -> tuple[Path, Path, list[dict[str, str]]]:
    """20 Effusion-positive and 40 other images (symlinked) and an NIH-style labels CSV of all 490."""
    with open(nih / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    positive = [r for r in rows if "Effusion" in r["findings"].split("|")][:20]
    chosen = positive + [r for r in rows if "Effusion" not in r["findings"].split("|")][:40]
    images = tmp_path / "images"
    images.mkdir()
    for r in chosen:
        (images / r["image"]).symlink_to(nih / "images" / r["image"])
    return images, nih / "labels.csv", chosen


def test_eval_then_heads_train_reuses_the_embeddings(subset, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    images, labels, chosen = subset
    tmp_path = tmp_path / "out"
    pleura("eval", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bundle"]["name"] == "demo" and len(summary["bundle"]["model_sha256"]) == 64
    assert summary["dataset"]["n_images"] == 60 and summary["dataset"]["n_rows_without_image"] == 430
    effusion = summary["findings"]["Effusion"]
    assert (effusion["n"], effusion["n_positive"]) == (60, 20)
    assert effusion["auc_ci95"][0] <= effusion["auc"] <= effusion["auc_ci95"][1]
    assert set(summary["findings"]) <= {"Cardiomegaly", "Effusion", "Atelectasis", "Abnormal"}
    for f in summary["findings"].values():
        assert (tmp_path / f["roc_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(tmp_path / CACHE) as z:
        assert sorted(z["images"].tolist()) == sorted(r["image"] for r in chosen)
        assert z["embeddings"].shape == (60, 160)
    cached_at = (tmp_path / CACHE).stat().st_mtime_ns
    capsys.readouterr()

    pleura("heads", "train", "--images", str(images), "--labels", str(labels), "--finding", "Effusion",
           "--target-sensitivity", "0.8", "--out", str(tmp_path))
    assert "running demo" not in capsys.readouterr().out  # every embedding came from the cache
    assert (tmp_path / CACHE).stat().st_mtime_ns == cached_at
    head = read_head(tmp_path / "head-Effusion.json")
    assert head["finding"] == "Effusion" and head["embedding_dim"] == 160
    assert head["bundle"] == summary["bundle"]
    cv = head["training"]["cross_validation"]
    assert (cv["n"], cv["n_positive"], cv["folds"]) == (60, 20, 5)
    assert 0.0 <= cv["auc_ci95"][0] <= cv["auc"] <= cv["auc_ci95"][1] <= 1.0
    point = head["training"]["operating_point"]
    assert point["sensitivity"] >= 0.8 and point["threshold"] == head["threshold"]
    assert (tmp_path / "roc-Effusion.png").read_bytes()[:4] == b"\x89PNG"
    with np.load(tmp_path / CACHE) as z:
        order = {n: i for i, n in enumerate(z["images"].tolist())}
        x = z["embeddings"][[order[r["image"]] for r in chosen]]
    p = head_probabilities(head, x)
    y = np.array([r in chosen[:20] for r in chosen])
    assert p[y].mean() > p[~y].mean()  # the refitted head separates its own training images


def test_heads_curve_and_unknown_finding(subset, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    images, labels, _ = subset
    tmp_path = tmp_path / "out"
    pleura("heads", "curve", "--images", str(images), "--labels", str(labels), "--finding", "Effusion",
           "--sizes", "10,25,all", "--repeats", "3", "--folds", "3", "--out", str(tmp_path))
    curve = json.loads((tmp_path / "curve-Effusion.json").read_text())
    assert [p["n_requested"] for p in curve["points"]][:2] == [10, 25]
    assert curve["points"][0]["draws"] == 9 and curve["points"][-1]["draws"] == 3
    assert (tmp_path / "curve-Effusion.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="not labelled"):
        pleura("heads", "train", "--images", str(images), "--labels", str(labels), "--finding", "Nonexistent",
               "--out", str(tmp_path))
