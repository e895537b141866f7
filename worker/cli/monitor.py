"""``pleura monitor``: each model against the final reports, per finding and window, and its alarms.

Exit status 0, or 2 when a figure alarms (its whole 95% interval below the model card's value);
1 for a bad option or a database that cannot answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from worker.settings import Settings

if TYPE_CHECKING:  # parsing the command line imports no engine
    from worker.monitor.concordance import Record
    from worker.monitor.stats import Estimate

ALARM_EXIT = 2


def _estimate(e: Estimate | None) -> str:
    return "-" if e is None else str(e)


def _stated(r: Record) -> str:
    if not r.stated:
        return "the bundle states no operating point for it: no alarm"
    return "model card: " + ", ".join(f"{f} {v:.3f}" for f, v in r.stated.items())


def table(records: list[Record]) -> str:
    """Per bundle version and finding, its model card and a row per window, oldest first."""
    from worker.monitor import concordance, plots

    lines = []
    head = (f"  {'WINDOW (UTC)':<36} {'N':>4} {'POS':>4} {'NEG':>4} {'EXCL':>4} {'UNLAB':>5}  "
            + "".join(f"{f.upper():<18}" for f in concordance.FIGURES) + "ALARM")
    for (bundle, version, finding), rs in plots.grouped(records).items():
        lines += [f"{bundle} {version} · {finding} · {_stated(rs[0])}", head]
        for r in rs:
            when = f"{r.start:%Y-%m-%d %H:%M} to {r.end:%Y-%m-%d %H:%M}"
            cells = "".join(f"{_estimate(r.figures[f]):<18}" for f in concordance.FIGURES)
            lines.append(f"  {when:<36} {r.n:>4} {r.positives:>4} {r.negatives:>4} {r.excluded:>4} "
                         f"{r.unlabelled:>5}  {cells}{', '.join(r.alarms) or '-'}")
        lines.append("")
    return "\n".join(lines).rstrip()


def cmd_monitor(settings: Settings, args: argparse.Namespace) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    from worker.ledger.db import Ledger, schema_is_current
    from worker.monitor import concordance, plots

    name, version = None, None
    if args.model is not None:
        name, _, version = args.model.partition(":")
        if not name.strip() or (":" in args.model and not version.strip()):
            sys.exit(f"error: --model {args.model!r} is not NAME or NAME:VERSION")
    days = settings.monitor_window_days if args.window_days is None else args.window_days
    if days <= 0 or args.windows < 1:
        sys.exit("error: --window-days must be above 0 and --windows at least 1")
    options = concordance.Options(days, args.windows, args.uncertain, name, version or None)
    ledger = Ledger(settings.effective_database_url)
    try:
        if not schema_is_current(ledger.engine):
            sys.exit("error: the database schema is not current; run `pleura db upgrade` first")
        records = concordance.run(ledger, settings, options)
    except SQLAlchemyError as exc:
        sys.exit(f"error: cannot read the ledger ({type(exc).__name__}); is PLEURA_DATABASE_URL right?")
    finally:
        ledger.close()
    written = plots.write_pngs(records, args.plots) if args.plots else []
    alarms = sum(len(r.alarms) for r in records)
    if args.json:
        print(json.dumps({"window_days": days, "windows": args.windows, "uncertain": args.uncertain,
                          "alarms": alarms, "records": [r.as_dict() for r in records],
                          "plots": [str(p) for p in written]}, indent=2))
    else:
        print(table(records) or "no analysed study in these windows")
        if written:
            print(f"wrote {len(written)} plots to {args.plots}")
        if alarms:
            print(f"ALARM: {alarms} figures lie wholly below the model card (exit status {ALARM_EXIT})")
    if alarms:
        sys.exit(ALARM_EXIT)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``monitor`` to the ``pleura`` subcommands."""
    text = "compare each model with the final radiology reports over time and against its model card"
    p = sub.add_parser("monitor", help=text, description=f"{text}. Exit status 2 when an alarm is raised.")
    p.add_argument("--model", help="bundle NAME or NAME:VERSION (default: every bundle version with results)")
    p.add_argument("--window-days", type=float,
                   help="days per window (default PLEURA_MONITOR_WINDOW_DAYS, 30); the newest ends now")
    p.add_argument("--windows", type=int, default=6, help="how many windows back from now (default 6)")
    p.add_argument("--uncertain", choices=["exclude", "positive", "negative"], default="exclude",
                   help="how a report's uncertain mention counts: left out (default), as positive, as negative")
    p.add_argument("--json", action="store_true", help="print the figures as a JSON document instead of a table")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="write one PNG per bundle version and finding (figures per window, model card dashed)")
    p.set_defaults(func=cmd_monitor)
