"""``pleura synth``: test DICOM files from NIH ChestX-ray14 PNG images (:mod:`worker.synth`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.cli.common import command
from worker.settings import Settings


def cmd_synth(settings: Settings, args: argparse.Namespace) -> None:
    from worker.progress import Progress
    from worker.synth.studies import TRANSFER_SYNTAXES, write_dataset_folder

    bar: Progress | None = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or Progress(total, "written")
        bar.advance(done - bar.done)

    paths = write_dataset_folder(args.images, args.labels, args.out, limit=args.limit,
                                 modality=args.modality,
                                 transfer_syntax=TRANSFER_SYNTAXES[args.transfer_syntax],
                                 single_study=args.same_study, progress=report)
    print(f"wrote {len(paths)} DICOM files to {args.out}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``synth`` to the ``pleura`` subcommands."""
    p = command(sub, "synth", "make test DICOM files from NIH ChestX-ray14 PNG images", cmd_synth)
    p.add_argument("--images", type=Path, required=True, help="folder of the NIH PNGs")
    p.add_argument("--labels", type=Path, required=True, help="the NIH labels CSV")
    p.add_argument("--out", type=Path, required=True, help="folder for the DICOM files")
    p.add_argument("--limit", type=int, help="at most N images")
    p.add_argument("--modality", choices=["CR", "DX"], default="CR")
    p.add_argument("--transfer-syntax", default="explicit", choices=["explicit", "j2k", "rle", "jpegls"])
    p.add_argument("--same-study", action="store_true", help="all images in one study of one patient")
