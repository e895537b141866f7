"""``pleura send``: C-STORE files or folders to a DICOM node."""

from __future__ import annotations

import argparse
import json
import sys

from worker.cli.common import command
from worker.settings import Settings


def cmd_send(settings: Settings, args: argparse.Namespace) -> None:
    """C-STORE ``args.paths`` one file at a time; one line (or ``--json`` record) per file, an unreadable
    file included; exit 1 if any was not stored."""
    from dicom_node.scu import AssociationRejected, collect_files, iter_send_files

    records: list[dict] = []
    sent = failed = 0
    try:
        files = collect_files(args.paths)
        for r in iter_send_files(args.host, args.port, files, called_ae=args.called_ae, calling_ae=args.calling_ae):
            sent, failed = sent + r.ok, failed + (not r.ok)
            if args.json:
                records.append({"file": r.name, "sop_instance_uid": r.sop_instance_uid,
                                "status": _dimse_status(r.status), "ok": r.ok, "error": r.error})
            else:
                print(f"{_dimse_status(r.status) or 'not sent'}  {r.name}" + (f"  ({r.error})" if r.error else ""),
                      flush=True)
    except (FileNotFoundError, AssociationRejected, ValueError) as exc:
        sys.exit(f"error: {exc}")
    if args.json:
        print(json.dumps({"sent": sent, "failed": failed, "results": records}, indent=2))
    else:
        print(f"{sent} sent, {failed} failed")
    sys.exit(1 if failed else 0)


def _dimse_status(status: int | None) -> str | None:
    """``0x0000``-style, None when never sent."""
    return f"0x{status:04X}" if status is not None else None


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``send`` to the ``pleura`` subcommands."""
    p = command(sub, "send", "send DICOM files or folders to a DICOM node (C-STORE)", cmd_send)
    p.add_argument("host", help="the receiving node's host name or address")
    p.add_argument("port", type=int, help="its DICOM port")
    p.add_argument("paths", nargs="+", help="DICOM files, or folders searched recursively")
    p.add_argument("--calling-ae", default="PLEURA_SCU", help="our AE title (default PLEURA_SCU)")
    p.add_argument("--called-ae", default="PLEURA", help="the receiver's AE title (default PLEURA)")
    p.add_argument("--json", action="store_true", help="print the results as a JSON document")
