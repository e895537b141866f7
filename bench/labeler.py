"""How well the report labeler reads chest X-ray report sentences: precision, recall and F1 per finding.

    .venv/bin/python -m bench.labeler [--set tests/data/report_sentences.csv] [--labeler module:attr]
        [--out bench/results]

The set has one row per (sentence, finding judged): ``id,text,finding,label`` with label present,
absent or uncertain, written by hand. Ids ``dev-*`` are the development part (the rules were
written against it, so its figures are optimistic); ids ``held-*`` the held-out part, written after
the rules were frozen. Each text is labelled once for the findings judged on it.

Per part and finding, for each class (present, absent, uncertain): precision, recall, F1 and
support (gold rows of that class); a prediction of None (not mentioned) is wrong for every gold
class. Also the exact-match accuracy, a confusion matrix (gold x predicted, None as ``none``), the
rows the labeler got wrong, and the labels as the monitor uses them: present is positive, absent and
None negative, uncertain left out of the denominators by default (``worker.reports.labels.truth``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.reports.labeler import LABELS, Labeler, load

SET = Path(__file__).resolve().parents[1] / "tests" / "data" / "report_sentences.csv"
PARTS = {"development": "dev-", "held-out": "held-"}
PREDICTED = (*LABELS, "none")


@dataclass(frozen=True)
class Row:
    id: str
    text: str
    finding: str
    label: str


def read_set(path: Path = SET) -> list[Row]:
    """The labelled rows of ``path``; ValueError names a row whose label is not one of present/absent/uncertain."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = [Row(r["id"], r["text"], r["finding"], r["label"]) for r in csv.DictReader(fh)]
    for row in rows:
        if row.label not in LABELS:
            raise ValueError(f"{path}: row {row.id} {row.finding}: label {row.label!r} is not one of {LABELS}")
    return rows


def predict(rows: Sequence[Row], labeler: Labeler) -> list[str]:
    """The labeler's label for each row (``none`` where it says nothing), each text labelled once."""
    judged: dict[str, list[str]] = {}
    for row in rows:
        judged.setdefault(row.text, []).append(row.finding)
    labels = {text: labeler.label(text, findings) for text, findings in judged.items()}
    return [labels[row.text][row.finding] or "none" for row in rows]


def _prf(gold: Sequence[str], pred: Sequence[str], cls: str) -> dict[str, float | int | None]:
    tp = sum(g == cls and p == cls for g, p in zip(gold, pred, strict=True))
    n_pred, support = sum(p == cls for p in pred), sum(g == cls for g in gold)
    precision = tp / n_pred if n_pred else None
    recall = tp / support if support else None
    f1 = 2 * tp / (n_pred + support) if n_pred + support else None
    return {"precision": _round(precision), "recall": _round(recall), "f1": _round(f1), "support": support,
            "predicted": n_pred}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def score(gold: Sequence[str], pred: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix of one group of rows."""
    matrix = {g: {p: 0 for p in PREDICTED} for g in LABELS}
    for g, p in zip(gold, pred, strict=True):
        matrix[g][p] += 1
    correct = sum(g == p for g, p in zip(gold, pred, strict=True))
    return {"n": len(gold), "accuracy": _round(correct / len(gold)) if gold else None,
            **{cls: _prf(gold, pred, cls) for cls in LABELS}, "confusion": matrix}


def evaluate(rows: Sequence[Row], pred: Sequence[str]) -> dict[str, Any]:
    """Per part (development, held-out, all): the overall score and one per finding."""
    result = {}
    for part, prefix in {**PARTS, "all": ""}.items():
        picked = [(r, p) for r, p in zip(rows, pred, strict=True) if r.id.startswith(prefix)]
        findings = sorted({r.finding for r, _ in picked})
        result[part] = {
            "texts": len({r.id for r, _ in picked}),
            "overall": score([r.label for r, _ in picked], [p for _, p in picked]),
            "findings": {f: score([r.label for r, _ in picked if r.finding == f],
                                  [p for r, p in picked if r.finding == f]) for f in findings},
        }
    return result


def downstream(rows: Sequence[Row], pred: Sequence[str]) -> dict[str, Any]:
    """The labels as the monitor counts them by default: uncertain (in the set or the prediction) left out."""
    from worker.reports.labels import truth

    pairs = [(truth(r.label), truth(None if p == "none" else p)) for r, p in zip(rows, pred, strict=True)]
    kept = [(g, p) for g, p in pairs if g is not None and p is not None]
    tp = sum(g and p for g, p in kept)
    return {"uncertain": "exclude", "rows": len(pairs), "left_out": len(pairs) - len(kept),
            "positive_precision": _round(tp / sum(p for _, p in kept)) if any(p for _, p in kept) else None,
            "positive_recall": _round(tp / sum(g for g, _ in kept)) if any(g for g, _ in kept) else None,
            "agreement": _round(sum(g == p for g, p in kept) / len(kept)) if kept else None}


def _table(part: dict[str, Any]) -> str:
    lines = ["| finding | n | accuracy | present P / R / F1 | absent P / R / F1 | uncertain P / R / F1 |",
             "|---|---|---|---|---|---|"]
    for name, s in [*part["findings"].items(), ("**all**", part["overall"])]:
        cells = [" / ".join("-" if s[c][k] is None else f"{s[c][k]:.2f}" for k in ("precision", "recall", "f1"))
                 for c in LABELS]
        lines.append(f"| {name} | {s['n']} | {s['accuracy']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, default=SET, help="labelled CSV: id,text,finding,label")
    parser.add_argument("--labeler", help="module:attribute of a labeler (default: the rules)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    labeler = load(args.labeler)
    rows = read_set(args.set)
    pred = predict(rows, labeler)
    report = {"command": " ".join(["python -m bench.labeler", *(argv if argv is not None else sys.argv[1:])]),
              "method": __doc__.split("\n\n", 2)[2].strip().replace("\n", " "),
              "labeler": labeler.name, "set": args.set.name, "parts": evaluate(rows, pred),
              "downstream": {part: downstream([r for r in rows if r.id.startswith(prefix)],
                                              [p for r, p in zip(rows, pred, strict=True) if r.id.startswith(prefix)])
                             for part, prefix in PARTS.items()},
              "errors": [{"id": r.id, "finding": r.finding, "gold": r.label, "predicted": p, "text": r.text}
                         for r, p in zip(rows, pred, strict=True) if r.label != p]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "labeler.json").write_text(json.dumps(report, indent=2) + "\n")
    for part, scored in report["parts"].items():
        if scored["texts"]:
            print(f"## {part} ({scored['texts']} texts)\n\n{_table(scored)}\n")
    print(f"wrote {args.out / 'labeler.json'}")
    return report


if __name__ == "__main__":
    main()
