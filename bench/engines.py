"""Engine throughput and latency per backend and batch size, and the effect of dynamic batching.

    .venv/bin/python -m bench.engines [--bundle demo] [--backends auto|all|onnxruntime,torch]
        [--batch-sizes 1,2,4,8,16,32,64] [--seconds 2] [--clients 16] [--out PATH]

Each measurement times ``Engine.infer`` end to end (preprocessing from a 512x512 image, the
model, probabilities and maps), as the worker calls it. Writes JSON and, if matplotlib is
installed, a PNG plot next to it. See bench/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines import BackendUnavailable, Engine, ParityError, load, load_bundle
from engines.backends import KINDS, auto_order, skipped_by_auto
from engines.batching import DynamicBatcher

IMAGE_SIZE = 512
#: a real CR matrix (rows, columns): the one-image latency a study of one radiograph sees
LARGE_IMAGE = (1955, 1841)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32) for _ in range(n)]


def _stats(latencies: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000.0
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90))}


def large_image_latency(engine: Engine, runs: int = 10) -> dict[str, Any]:
    """Latency of one full-size CR image alone (preprocessing from 1955 x 1841 included)."""
    image = np.random.default_rng(2).random(LARGE_IMAGE, dtype=np.float32)
    engine.infer([image])  # warm-up
    latencies = []
    for _ in range(runs):
        t0 = time.perf_counter()
        engine.infer([image])
        latencies.append(time.perf_counter() - t0)
    return {"image": f"{LARGE_IMAGE[0]}x{LARGE_IMAGE[1]}", "runs": runs, **_stats(latencies)}


def batch_sweep(engine: Engine, batch_sizes: Sequence[int], seconds: float) -> list[dict[str, Any]]:
    """images/s and per-batch latency at each batch size, each measured for about ``seconds``."""
    engine.max_batch = max(batch_sizes)  # one backend call per batch
    pool = _images(max(batch_sizes))
    rows = []
    for size in batch_sizes:
        images = pool[:size]
        engine.infer(images)  # warm-up (allocation, autotuning)
        latencies: list[float] = []
        started = time.perf_counter()
        while len(latencies) < 3 or time.perf_counter() - started < seconds:
            t0 = time.perf_counter()
            engine.infer(images)
            latencies.append(time.perf_counter() - t0)
        rows.append({"batch": size, "runs": len(latencies), "images_per_s": size * len(latencies) / sum(latencies),
                     **_stats(latencies)})
        print(f"  {engine.backend:<40} batch {size:>3}: {rows[-1]['images_per_s']:8.1f} images/s, "
              f"median {rows[-1]['median_ms']:7.2f} ms, p90 {rows[-1]['p90_ms']:7.2f} ms", file=sys.stderr)
    return rows


def concurrent_clients(infer: Callable[[list[np.ndarray]], object], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads each sending single-image requests back to back for ``seconds``."""
    images = _images(clients, seed=1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        start.wait()
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            infer([images[i]])
            latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds
    t0 = time.perf_counter()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [x for per_client in latencies for x in per_client]
    return {"clients": clients, "requests": len(done), "images_per_s": len(done) / wall, **_stats(done)}


def batching_scenario(
    engine: Engine, clients: int, seconds: float, max_batch: int, max_wait_ms: float
) -> dict[str, Any]:
    """Throughput of concurrent single-image clients, calling the engine directly vs through a batcher."""
    engine.max_batch = max(engine.max_batch, max_batch)
    engine.infer(_images(max_batch))  # warm-up at the largest batch
    result: dict[str, Any] = {"backend": engine.backend, "max_batch": max_batch, "max_wait_ms": max_wait_ms}
    for k in sorted({1, clients}):
        direct = concurrent_clients(engine.infer, k, seconds)
        with DynamicBatcher(engine, max_batch=max_batch, max_wait_ms=max_wait_ms) as batcher:
            batched = concurrent_clients(batcher.infer, k, seconds)
            batched["mean_batch"] = batcher.images / max(batcher.batches, 1)
        result[f"clients_{k}"] = {"direct": direct, "batched": batched}
        print(f"  {k:>2} clients: direct {direct['images_per_s']:7.1f} images/s (median {direct['median_ms']:.1f} ms), "
              f"batched {batched['images_per_s']:7.1f} images/s (median {batched['median_ms']:.1f} ms, "
              f"mean batch {batched['mean_batch']:.1f})", file=sys.stderr)
    return result


def _engines(bundle_name: str, which: str) -> tuple[list[Engine], dict[str, str]]:
    bundle = load_bundle(bundle_name)
    skipped = dict(skipped_by_auto())
    if which == "auto":
        return [load(bundle)], skipped
    kinds = auto_order(bundle) if which == "all" else which.split(",")
    engines = []
    for kind in kinds:
        if kind not in KINDS:
            raise SystemExit(f"unknown backend {kind!r}; choose auto, all or some of {', '.join(KINDS)}")
        try:
            engines.append(load(bundle, backend=kind))
        except (BackendUnavailable, ParityError) as exc:
            skipped[kind] = str(exc)
    return engines, skipped


def _plot(report: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no plot was drawn (pip install matplotlib to get one)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run in report["backends"]:
        sizes = [r["batch"] for r in run["batches"]]
        ax1.plot(sizes, [r["images_per_s"] for r in run["batches"]], marker="o", label=run["backend"])
        ax2.plot(sizes, [r["median_ms"] for r in run["batches"]], marker="o", label=run["backend"])
    for ax, label in ((ax1, "images/s"), (ax2, "median latency per batch (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['bundle']} on {report['host']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for package in ("onnxruntime", "torch", "tensorrt", "numpy"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="demo")
    parser.add_argument("--backends", default="all", help="auto, all, or a comma-separated list")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per point")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients in the batching scenario")
    parser.add_argument("--batch-max", type=int, default=32)
    parser.add_argument("--batch-max-wait-ms", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results") / f"engines-{socket.gethostname()}.json")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    engines, skipped = _engines(args.bundle, args.backends)
    if not engines:
        raise SystemExit(f"no backend could run: {skipped}")
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.engines", *(argv if argv is not None else sys.argv[1:])]),
        "bundle": args.bundle,
        "image": f"{IMAGE_SIZE}x{IMAGE_SIZE} float32 per request, preprocessed by the engine",
        "host": {"name": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "processor": platform.processor() or platform.machine(), "gpu": _gpu(),
                 "load_average_1m_at_start": os.getloadavg()[0]},
        "versions": _versions(),
        "skipped": skipped,
        "seconds_per_point": args.seconds,
        "backends": [],
    }
    for engine in engines:
        print(f"{engine.backend} ({engine.precision}): batch sweep", file=sys.stderr)
        report["backends"].append({"backend": engine.backend, "precision": engine.precision,
                                   "batches": batch_sweep(engine, sizes, args.seconds),
                                   "large_image": large_image_latency(engine)})
    print(f"{engines[0].backend}: dynamic batching with {args.clients} concurrent clients", file=sys.stderr)
    report["dynamic_batching"] = batching_scenario(
        engines[0], args.clients, args.seconds, args.batch_max, args.batch_max_wait_ms
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    note = _plot(report, png)
    report["plot"] = None if note else png.name
    if note:
        report["plot_note"] = note
        print(note, file=sys.stderr)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}" + ("" if note else f" and {png}"), file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
