"""``pleura reports label FILE.csv``: what the report labeler reads in a site's own report texts.

The CSV (UTF-8, a header row) needs the columns ``id`` and ``text``; others are ignored. Each
text is labelled for every finding of the bundle (``--model``, default ``PLEURA_MODEL``) by the
configured labeler (``PLEURA_REPORT_LABELER``, default the rules of :mod:`worker.reports.rules`).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from worker.settings import Settings

REQUIRED = ("id", "text")


def read_reports(path: Path) -> list[dict[str, str]]:
    """The rows of ``path`` as {id, text}; ValueError says what is wrong with the file."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED if c not in columns]
            if missing:
                raise ValueError(f"{path}: no {' or '.join(repr(c) for c in missing)} column (it has: "
                                 f"{', '.join(columns) or 'no header'}); the CSV needs columns id and text")
            return [{"id": row["id"], "text": row["text"] or ""} for row in reader]
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder, not a CSV file") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}): save it as CSV UTF-8") from None
    except csv.Error as exc:
        raise ValueError(f"{path}: not a readable CSV ({exc})") from None


def label_rows(settings: Settings, rows: list[dict[str, str]], model: str | None) -> tuple[str, list[dict[str, Any]]]:
    """The labeler's name and one record per row: its id and a label (or None) per finding of the bundle."""
    from worker.bundles.catalogue import bundle
    from worker.reports.labeler import load

    findings = [f.name for f in bundle(settings, model or settings.model).reported_findings]
    labeler = load(settings.report_labeler)
    return labeler.name, [{"id": row["id"], "labels": labeler.label(row["text"], findings)} for row in rows]


def _print_table(name: str, records: list[dict[str, Any]]) -> None:
    if not records:
        print(f"no rows (labeler {name})")
        return
    findings = list(records[0]["labels"])
    cells = [[str(r["id"]), *(r["labels"][f] or "-" for f in findings)] for r in records]
    header = ["id", *findings]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    for row in [header, *cells]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    print(f"\nlabeler {name}; '-': not mentioned")


def cmd_label(settings: Settings, args: argparse.Namespace) -> None:
    from engines import BundleError

    try:
        name, records = label_rows(settings, read_reports(args.csv), args.model)
    except (BundleError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        _print_table(name, records)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``reports`` to the ``pleura`` subcommands."""
    text = "final radiology reports: check how the report labeler reads them"
    p = sub.add_parser("reports", help=text, description=text)
    reports = p.add_subparsers(dest="action", required=True)
    text = ("label each report text of a CSV (columns id, text) present / absent / uncertain for every finding "
            "of the model")
    label = reports.add_parser("label", help=text, description=f"{text}; '-' or null: not mentioned.")
    label.add_argument("csv", type=Path, metavar="FILE.csv", help="UTF-8 CSV with a header row naming id and text")
    label.add_argument("--model", help="bundle name or path whose findings are labelled (default: PLEURA_MODEL)")
    label.add_argument("--json", action="store_true", help="print the records as a JSON list")
    label.set_defaults(func=cmd_label)
