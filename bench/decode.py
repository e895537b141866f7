"""Decoding speed on one core: each transfer syntax with each installed pydicom decoder.

    .venv/bin/python -m bench.decode [--files 8] [--repeats 5] [--data build/ingest-data] [--out bench/results]

Images: the real CR of ``../shared/data/dicom`` (1955 x 1841, 15-bit, MONOCHROME1, lossy JPEG
2000) and the first ``--files`` of the ingest benchmark's full-size 12-bit chest X-rays (about
2500 x 2500; ``pleura synth`` from the NIH sample) in JPEG 2000 lossless, JPEG-LS lossless and
Explicit VR Little Endian, generated into ``--data`` if missing. The process is pinned to one CPU.
Per image, the median of ``--repeats`` runs (after one untimed run) of (a) the pixel data decode
alone, ``pydicom.pixels.pixel_array`` with each decoding plugin pydicom finds installed for the
syntax, and (b) the whole of ``dicom_node.pixels.decode`` (decode, Modality LUT, MONOCHROME1,
window to float32 in [0, 1]) as Pleura runs it, from the parsed file. Writes ``decode.json`` and
``decode.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders.base import get_decoder

from bench.common import host
from bench.ingest import WARM_UP_FILES, dataset
from dicom_node.pixels import decode

REAL_CR = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "RG1_J2KI.dcm"
SYNTHESIZED = ("j2k", "jpegls", "explicit")
INGEST_FILES = 32 + WARM_UP_FILES  # bench.ingest's default set, generated once for both


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # untimed: imports, first allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(path: Path, label: str, repeats: int) -> dict[str, Any]:
    """One image: the decode alone per plugin, and Pleura's whole decode."""
    ds = dcmread(path)
    syntax = ds.file_meta.TransferSyntaxUID
    plugins = get_decoder(syntax).available_plugins if syntax.is_compressed else ("numpy",)
    row: dict[str, Any] = {"image": label, "file": path.name, "transfer_syntax": syntax.name,
                           "matrix": f"{ds.Columns}x{ds.Rows}", "bits_stored": int(ds.BitsStored),
                           "megapixels": round(ds.Rows * ds.Columns / 1e6, 2), "pixel_data_s": {}}
    for plugin in plugins:
        option = {} if plugin == "numpy" else {"decoding_plugin": plugin}
        seconds = _median_seconds(lambda option=option: pixel_array(ds, **option), repeats)
        row["pixel_data_s"][plugin] = round(seconds, 4)

    times = []
    for _ in range(repeats + 1):  # the first untimed, as above
        fresh = dcmread(path)  # a dataset keeps its decoded array: parse the file each time
        started = time.perf_counter()
        decode(fresh)
        times.append(time.perf_counter() - started)
    row["pleura_decode_s"] = round(statistics.median(times[1:]), 4)
    return row


def plot(report: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no plot was drawn"
    fig, ax = plt.subplots(figsize=(10, 4.5))
    syntaxes = sorted({r["transfer_syntax"] for r in report["images"]})
    plugins = sorted({p for r in report["images"] for p in r["pixel_data_s"]} | {"pleura (whole)"})
    width = 0.8 / len(plugins)
    for k, plugin in enumerate(plugins):
        values = []
        for syntax in syntaxes:
            rows = [r for r in report["images"] if r["transfer_syntax"] == syntax]
            times = [r["pleura_decode_s"] if plugin == "pleura (whole)" else r["pixel_data_s"].get(plugin)
                     for r in rows]
            times = [t for t in times if t is not None]
            values.append(statistics.median(times) if times else 0.0)
        ax.bar([i + k * width for i in range(len(syntaxes))], values, width, label=plugin)
    ax.axhline(0.5, color="grey", linestyle="--", label="target 0.5 s (~2500x2500 JPEG 2000)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(syntaxes))], [s[:34] for s in syntaxes], fontsize=8)
    ax.set(ylabel="seconds per image (median over images)", title=f"decoding on one core, {report['host']['name']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path("build/ingest-data"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    report: dict[str, Any] = {"command": " ".join(["python -m bench.decode", *(argv or sys.argv[1:])]),
                              "method": __doc__.split("\n\n", 2)[2].strip().replace("\n", " "),
                              "host": {**host(), "pinned_to_cpus": sorted(os.sched_getaffinity(0))}, "images": []}
    images = [(REAL_CR, "real CR (RG1_J2KI)")] if REAL_CR.is_file() else []
    for syntax in SYNTHESIZED:
        made = dataset(args.data, syntax, INGEST_FILES)[:args.files]  # the ingest benchmark's files
        images += [(path, f"NIH synth {syntax}") for path in made]
    for path, label in images:
        report["images"].append(measure(path, label, args.repeats))
        row = report["images"][-1]
        print(f"{label:22} {row['matrix']:>10} {row['pixel_data_s']} pleura {row['pleura_decode_s']} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    note = plot(report, args.out / "decode.png")
    report["plot"] = None if note else "decode.png"
    (args.out / "decode.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
