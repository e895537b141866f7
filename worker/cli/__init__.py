"""The ``pleura`` command line, one module per command group; :func:`main` is the entry point.

``serve``, ``listen``, ``worker``, ``db`` (:mod:`worker.cli.processes`); ``send``; ``status``;
``search``; ``models`` (:mod:`worker.cli.bundles`); ``synth``; ``eval`` and ``heads``
(:mod:`worker.cli.heads`); ``audit``; ``reports``; ``monitor``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from worker.cli import audit, bundles, heads, monitor, processes, reports, search, send, status, synth
from worker.settings import load_settings

DESCRIPTION = ("Pleura receives chest X-ray studies from a PACS over DICOM, analyses them with AI models and "
               "sends the results (a structured report and a heatmap image) back into each study; every step is "
               "recorded in its database for audit.")
EPILOG = ("`pleura COMMAND --help` describes a command and its options. Settings come from PLEURA_* environment "
          "variables and the --config file. Commands that print records take --json for a JSON document.")
#: in ``pleura --help`` order
GROUPS = (processes, send, status, search, bundles, synth, heads, audit, reports, monitor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pleura", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--config", type=Path, help="TOML file with settings (env PLEURA_* wins)")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except (FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: invalid settings: {exc}")
    from worker.logging import configure

    configure(settings.log_level, settings.log_format)
    args.func(settings, args)
