"""What a radiologist waits: the end of the sender's association to the SR at the destination.

    .venv/bin/python -m bench.completion [--rates 0.2,1] [--studies 10] [--images 1]
        [--modes embedded,production] [--configs default,quiet5] [--model demo --models-dir DIR]
        [--transfer-syntax j2k] [--nih ../shared/data/nih-cxr14-sample]
        [--pg-admin URL] [--rabbitmq-host 127.0.0.1:5672] [--name completion] [--out bench/results]

For each mode (``embedded``: ``pleura serve`` on SQLite and the in-process broker; ``production``:
``pleura listen`` + one ``pleura worker`` on a fresh PostgreSQL database and RabbitMQ virtual
host) two configurations run in the same command, each in a fresh stack: ``default`` (no
completion setting at all: the association rule with its 0.5 s settle time, the 10 s quiet period as
fallback, the 2 s sweep interval) and ``quiet5`` (a plain 5 s quiet timer, MONAI Informatics
Gateway's default: ``PLEURA_STUDY_SETTLE_SECONDS=-1``, ``PLEURA_STUDY_QUIET_SECONDS=5``).

Studies as in :mod:`bench.time_to_result` (``pleura synth`` CR images of adults at their full
matrix, fresh UIDs, ``--images`` per study over one association that is then released), study k
of a rate leaving at ``k / rate`` seconds. Per study: (mtime of its SR at ``storescp``) - (the
moment the sender's A-RELEASE completed). Reports p50/p95/max per mode, configuration and rate,
and the ratio quiet5 / default of the p50 and p95.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset

from bench.common import free_port, host, postgres_db, process, rabbitmq_vhost, wait_port
from bench.time_to_result import (
    NIH,
    PLEURA,
    Destination,
    fresh_study,
    send_study,
    start_destination,
    start_production,
    templates,
)

CONFIGS = {"default": {}, "quiet5": {"PLEURA_STUDY_SETTLE_SECONDS": "-1", "PLEURA_STUDY_QUIET_SECONDS": "5"},
           "settle1": {"PLEURA_STUDY_SETTLE_SECONDS": "1"},
           "database": {"PLEURA_STORAGE": "database"}}  # bytes in PostgreSQL (worker.storage); production only


def _stack(stack: ExitStack, mode: str, config: dict[str, str], tmp: Path, args: argparse.Namespace) -> tuple[
        int, Destination]:
    """Start the mode's processes (and a storescp) with ``config``; the DICOM port and the destination."""
    dest_port, destination = start_destination(stack, tmp)
    port = free_port()
    env = {"PLEURA_DATA_DIR": str(tmp / "var"), "PLEURA_DICOM_PORT": str(port),
           "PLEURA_DESTINATIONS": f"DEST@127.0.0.1:{dest_port}", "PLEURA_MIN_FREE_DISK_MB": "20", **config}
    if mode == "embedded":
        serve = stack.enter_context(process([PLEURA, "serve"], tmp / "serve.log", env))
        wait_port(port, serve, tmp / "serve.log")
    else:
        env["PLEURA_DATABASE_URL"] = stack.enter_context(postgres_db(args.pg_admin))
        env["PLEURA_BROKER_URL"] = stack.enter_context(rabbitmq_vhost(args.rabbitmq_host))
        start_production(stack, env, tmp)
    return port, destination


def run_rate(port: int, dest: Destination, pool: list[Dataset], rate: float, n: int, images: int,
             offset: int) -> dict[str, Any]:
    studies = [fresh_study(pool, offset + k * images, images) for k in range(n)]
    uids = [str(s[0].StudyInstanceUID) for s in studies]
    released: dict[str, float] = {}
    t0 = time.monotonic()
    for k, study in enumerate(studies):
        delay = t0 + k / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        released[uids[k]] = send_study(port, study)[1]
    dest.wait(uids, 60)
    waits = [dest.sr_at[u] - released[u] for u in uids if u in dest.sr_at]
    pct = lambda q: round(float(np.percentile(waits, q)), 3) if waits else None  # noqa: E731
    return {"rate_per_s": rate, "studies": n, "received": len(waits), "p50_s": pct(50), "p95_s": pct(95),
            "max_s": pct(100), "seconds": [round(w, 3) for w in waits]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0.2,1", help="studies per second, comma-separated")
    parser.add_argument("--studies", type=int, default=10, help="studies per rate")
    parser.add_argument("--images", type=int, default=1, help="images per study")
    parser.add_argument("--pool", type=int, default=8, help="distinct images synthesized (reused with new UIDs)")
    parser.add_argument("--modes", default="embedded,production")
    parser.add_argument("--configs", default="default,quiet5", help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--model", default="demo", help="PLEURA_MODEL (a bundle in --models-dir)")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="PLEURA_MODELS_DIR (e.g. bench.real_size_bundles' --out)")
    parser.add_argument("--transfer-syntax", default="j2k", choices=["explicit", "j2k", "rle", "jpegls"])
    parser.add_argument("--nih", type=Path, default=NIH)
    parser.add_argument("--pg-admin", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rabbitmq-host", default="127.0.0.1:5672")
    parser.add_argument("--name", default="completion", help="stem of the JSON written")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    started = time.time()
    runs = []
    with tempfile.TemporaryDirectory(prefix="pleura-completion-") as scratch:
        pool = templates(args.nih, args.pool, args.transfer_syntax, Path(scratch) / "pool")
        for mode in args.modes.split(","):
            for name in args.configs.split(","):
                config = {**CONFIGS[name], "PLEURA_MODEL": args.model}
                if args.models_dir is not None:
                    config["PLEURA_MODELS_DIR"] = str(args.models_dir.resolve())
                tmp = Path(scratch) / f"{mode}-{name}"
                tmp.mkdir()
                with ExitStack() as stack:
                    port, dest = _stack(stack, mode, config, tmp, args)
                    warm = run_rate(port, dest, pool, 1.0, 2, args.images, 0)  # model load, connections
                    if warm["received"] < 2:
                        raise RuntimeError(f"{mode}/{name}: warm-up studies got no results")
                    for i, rate in enumerate(rates):
                        r = {"mode": mode, "config": name,
                             **run_rate(port, dest, pool, rate, args.studies, args.images, i + 1)}
                        runs.append(r)
                        print(f"{mode:10s} {name:8s} {rate:g}/s: {r['received']}/{r['studies']} p50 {r['p50_s']} "
                              f"p95 {r['p95_s']} max {r['max_s']}", flush=True)
    ratios = []
    for mode in args.modes.split(",") if args.configs == "default,quiet5" else []:
        for rate in rates:
            base, timer = (next(r for r in runs if (r["mode"], r["config"], r["rate_per_s"]) == (mode, c, rate))
                           for c in ("default", "quiet5"))
            ratios.append({"mode": mode, "rate_per_s": rate,
                           "p50_ratio": round(timer["p50_s"] / base["p50_s"], 2),
                           "p95_ratio": round(timer["p95_s"] / base["p95_s"], 2),
                           "default_p95_under_2s": base["p95_s"] < 2.0 and base["received"] == base["studies"]})
    report = {"benchmark": "completion", "host": host(),
              "command": " ".join([".venv/bin/python -m bench.completion", *(argv or sys.argv[1:])]),
              "definition": "SR file mtime at storescp - end of the sender's A-RELEASE",
              "configs": {c: CONFIGS[c] for c in args.configs.split(",")}, "model": args.model,
              "transfer_syntax": args.transfer_syntax, "images_per_study": args.images,
              "runs": runs, "ratios": ratios, "wall_s": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(ratios))
    return report


if __name__ == "__main__":
    main()
