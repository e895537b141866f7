"""The concordance figures over time as PNG (matplotlib, Agg backend, imported on first use).

One image per bundle version and finding: a panel per figure with its value and 95% interval in
each window (red where it alarms) and the model card's value as a dashed line.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from worker.monitor.concordance import FIGURES, Record

_TITLES = {"sensitivity": "Sensitivity", "specificity": "Specificity", "ppv": "PPV", "npv": "NPV", "auc": "AUC"}


def grouped(records: Iterable[Record]) -> dict[tuple[str, str, str], list[Record]]:
    """Records by (bundle, version, finding), oldest window first."""
    groups: dict[tuple[str, str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[r.bundle, r.version, r.finding].append(r)
    return {key: sorted(rs, key=lambda r: -r.window) for key, rs in groups.items()}


def finding_png(records: list[Record], out: BinaryIO | Path) -> None:
    """One bundle version's finding over its windows (``records`` oldest first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = records[0]
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(2.6 * len(FIGURES), 3.0), dpi=100, sharey=True)
    x = list(range(len(records)))
    ticks = [f"{r.end:%Y-%m-%d}\nn={r.n}" for r in records]
    for ax, figure in zip(axes, FIGURES, strict=True):
        for i, r in enumerate(records):
            e = r.figures[figure]
            if e is None:
                continue
            low, high = (e.low, e.high) if e.low is not None and e.high is not None else (e.value, e.value)
            ax.errorbar([i], [e.value], yerr=[[e.value - low], [high - e.value]], fmt="o", capsize=3, ms=4,
                        color="#c0392b" if figure in r.alarms else "#1d3557")
        if figure in first.stated:
            ax.axhline(first.stated[figure], ls="--", lw=1.2, color="black", alpha=0.7, label="model card")
            ax.legend(fontsize=7, loc="lower left")
        ax.set_title(_TITLES[figure], fontsize=10)
        ax.set_xticks(x, ticks, fontsize=6)
        ax.set_xlim(-0.5, len(records) - 0.5)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{first.bundle} {first.version} · {first.finding} (window ends, UTC; 95% intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def png_bytes(records: list[Record]) -> bytes:
    buffer = BytesIO()
    finding_png(records, buffer)
    return buffer.getvalue()


def write_pngs(records: Iterable[Record], folder: Path) -> list[Path]:
    """``folder/<bundle>-<version>-<finding>.png`` per bundle version and finding; the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (bundle, version, finding), rs in grouped(records).items():
        path = folder / (re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{bundle}-{version}-{finding}") + ".png")
        finding_png(rs, path)
        paths.append(path)
    return paths
