"""PNG figures for heads and evaluations (matplotlib, Agg backend, imported on first use)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_png(curves: dict[str, tuple[np.ndarray, np.ndarray, str]], path: Path, title: str,
            points: dict[str, tuple[float, float]] | None = None) -> None:
    """ROC curves (name -> (fpr, tpr, legend label)) with optional operating points (name -> (fpr, tpr))."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.2), dpi=110)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    for name, (fpr, tpr, label) in curves.items():
        (line,) = ax.plot(fpr, tpr, lw=1.8, label=label)
        if points and name in points:
            ax.plot(*points[name], "o", color=line.get_color(), ms=6)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curve_png(curves: dict[str, dict], path: Path, title: str, references: dict[str, float] | None = None) -> None:
    """Learning curves (label -> :func:`engines.heads.learning_curve` result): mean AUC, 95% band of draws.

    ``references`` (label -> AUC) are drawn as dashed horizontal lines.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    for label, curve in curves.items():
        pts = curve["points"]
        n = [p["n_labelled_mean"] for p in pts]
        (line,) = ax.plot(n, [p["auc_mean"] for p in pts], "o-", lw=1.8, label=label)
        ax.fill_between(n, [p["auc_p2_5"] for p in pts], [p["auc_p97_5"] for p in pts],
                        color=line.get_color(), alpha=0.15)
    for label, value in (references or {}).items():
        ax.axhline(value, ls="--", lw=1.2, color="black", alpha=0.6, label=label)
    ax.axhline(0.5, ls=":", color="grey", lw=1)
    ax.set_xscale("log")
    ax.set(xlabel="labelled training images", ylabel="test AUC", ylim=(0.3, 1.0), title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
