"""Time to result under load, and where it goes: production stack, studies pushed at fixed rates.

    .venv/bin/python -m bench.time_to_result [--rates 0.25,0.5,1,1.5,2] [--studies 20] [--images 1]
        [--quiet 1] [--sweep 0.2] [--transfer-syntax j2k] [--nih ../shared/data/nih-cxr14-sample]
        [--pg-admin URL] [--rabbitmq-host 127.0.0.1:5672] [--backend auto] [--storage local]
        [--name time_to_result]
        [--out bench/results]

Stack: ``pleura db upgrade``, ``pleura listen`` (listener + sweeper) and one ``pleura worker``
(default concurrency) on PostgreSQL (a fresh database ``pleura_bench_<hex>`` on ``--pg-admin``'s
server, dropped afterwards) and RabbitMQ (a fresh virtual host on the local node, made and
deleted with ``rabbitmqctl``, so no queue is shared with anything else), delivering to a DCMTK
``storescp``.

Studies: ``pleura synth`` CR images of adults from the NIH sample at their full original matrix
(12-bit, ``--transfer-syntax``, JPEG 2000 lossless by default), each sent with fresh Study,
Series and SOP Instance UIDs (the pixel data stay as encoded), ``--images`` per study over one
pynetdicom association per study. Study k of a rate leaves at ``k / rate`` seconds.

Per study, time to result = (mtime of the SR file at ``storescp``) - (time the last C-STORE response
came back to the sender) - ``--quiet``. A rate is *sustainable* when every SR arrived and the median
of the last third of its studies is within 0.5 s of the median of the first third (no growing
backlog). Stages come from the ledger: ``v_study_timeline`` (quiet, wait, processing, delivery) and,
inside processing, the ``timings`` of each ``job_succeeded`` event (read+decode,
preprocess+inference, SR/SC build; for an image prepared on arrival, only its header is read and
nothing inferred, and the count of such images is reported); ``other`` is the rest of processing
(claim, loading the job, the finishing transaction). ``--backend`` is the worker's
``PLEURA_BACKEND`` (``auto`` takes TensorRT or CUDA where a GPU is; the backends the jobs used are
recorded); writes ``<--name>.json`` and ``.png`` (e.g. ``--name time_to_result-gpu`` for a GPU
host).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import create_engine, text

from bench.common import free_port, host, postgres_db, process, rabbitmq_vhost, wait_port

PLEURA = str(Path(sys.executable).with_name("pleura"))
SR_MODALITY = "SR"
GROWTH_LIMIT_S = 0.5  # last third's median minus first third's: more means a backlog builds
NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14-sample"
STAGES = ("quiet_s", "wait_s", "decode_s", "inference_s", "build_s", "other_s", "delivery_s")


# --- studies -----------------------------------------------------------------------------------------


def templates(nih: Path, count: int, transfer_syntax: str, into: Path) -> list[Dataset]:
    """``count`` adult CR images written by ``pleura synth`` (more are made, children are dropped)."""
    subprocess.run([PLEURA, "synth", "--images", str(nih / "images"), "--labels", str(nih / "labels.csv"),
                    "--out", str(into), "--limit", str(count * 2), "--transfer-syntax", transfer_syntax],
                   check=True, capture_output=True, timeout=1800)
    adults = [ds for ds in (dcmread(p) for p in sorted(into.glob("*.dcm"))) if int(str(ds.PatientAge)[:3]) >= 18]
    if len(adults) < count:
        raise SystemExit(f"only {len(adults)} adult images among the first {count * 2} of the sample")
    return adults[:count]


def fresh_study(pool: list[Dataset], first: int, images: int) -> list[Dataset]:
    """``images`` instances from the pool with new UIDs, in one new study."""
    study_uid = generate_uid()
    out = []
    for i in range(images):
        ds = copy.deepcopy(pool[(first + i) % len(pool)])  # the encoded pixel bytes are shared (immutable)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def send_study(port: int, datasets: list[Dataset]) -> tuple[float, float]:
    """C-STORE over one association, then A-RELEASE; the wall-clock times of the last Success
    response and of the end of the release."""
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = 0
    for ds in datasets:
        ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA")
    if not assoc.is_established:
        raise RuntimeError("association refused")
    acked = 0.0
    for ds in datasets:
        status = assoc.send_c_store(ds)
        acked = time.time()
        if int(getattr(status, "Status", -1)) != 0:
            assoc.abort()
            raise RuntimeError(f"C-STORE status {getattr(status, 'Status', None)}")
    assoc.release()
    return acked, time.time()


class Destination:
    """Watches a ``storescp -uf`` folder: the mtime of each study's first SR file."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen, self.sr_at = folder, set[str](), dict[str, float]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for path in self.folder.iterdir():
                if path.name in self.seen:
                    continue
                try:
                    mtime = path.stat().st_mtime
                    ds = dcmread(path, stop_before_pixels=True)
                    modality, study = str(ds.Modality), str(ds.StudyInstanceUID)
                except Exception:  # still being written: read it on the next pass
                    continue
                self.seen.add(path.name)
                if modality == SR_MODALITY:
                    self.sr_at.setdefault(study, mtime)

    def wait(self, studies: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(s in self.sr_at for s in studies):
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def start_destination(stack: ExitStack, tmp: Path) -> tuple[int, Destination]:
    """A DCMTK ``storescp`` (AE ``DEST``) writing into ``tmp/received``, watched; its port."""
    received = tmp / "received"
    received.mkdir()
    port = free_port()
    proc = stack.enter_context(process(["storescp", "-aet", "DEST", "-od", str(received), "-uf", "+xa", str(port)],
                                       tmp / "storescp.log"))
    wait_port(port, proc, tmp / "storescp.log")
    dest = Destination(received)
    stack.callback(dest.stop)
    return port, dest


def start_production(stack: ExitStack, env: dict[str, str], tmp: Path) -> None:
    """``pleura db upgrade``, then ``pleura listen`` and one ``pleura worker`` with ``env``, until the
    listener's port (``PLEURA_DICOM_PORT``) is open."""
    subprocess.run([PLEURA, "db", "upgrade"], env={**os.environ, **env}, check=True, capture_output=True,
                   timeout=120)
    listen = stack.enter_context(process([PLEURA, "listen"], tmp / "listen.log", env))
    stack.enter_context(process([PLEURA, "worker"], tmp / "worker.log", env))
    wait_port(int(env["PLEURA_DICOM_PORT"]), listen, tmp / "listen.log")


# --- one rate ----------------------------------------------------------------------------------------


def run_rate(port: int, dest: Destination, pool: list[Dataset], rate: float, n: int, images: int,
             quiet: float, drain: float, offset: int) -> dict[str, Any]:
    studies = [fresh_study(pool, offset + k * images, images) for k in range(n)]
    uids = [str(s[0].StudyInstanceUID) for s in studies]
    acked: dict[str, float] = {}
    late = []
    t0 = time.monotonic()
    for k, study in enumerate(studies):
        delay = t0 + k / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        late.append(max(0.0, -delay))
        acked[uids[k]] = send_study(port, study)[0]
    dest.wait(uids, drain)
    ttr = [dest.sr_at[u] - acked[u] - quiet if u in dest.sr_at else None for u in uids]
    got = [t for t in ttr if t is not None]
    third = max(1, n // 3)
    first = _median([t for t in ttr[:third] if t is not None])
    last = _median([t for t in ttr[-third:] if t is not None])
    growth = last - first
    return {
        "rate_per_s": rate, "studies": n, "received": len(got), "study_uids": uids,
        "sender_max_late_s": round(max(late), 3),
        "time_to_result_s": [None if t is None else round(t, 3) for t in ttr],
        "p50_s": _pct(got, 50), "p95_s": _pct(got, 95), "p99_s": _pct(got, 99), "max_s": _pct(got, 100),
        "first_third_median_s": round(first, 3), "last_third_median_s": round(last, 3),
        "growth_s": round(growth, 3),
        "sustainable": len(got) == n and growth < GROWTH_LIMIT_S,
    }


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


# --- stages from the ledger --------------------------------------------------------------------------


def stages(db_url: str, by_rate: dict[float, list[str]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Median and p95 of each stage per rate, from v_study_timeline and job_succeeded timings; and the
    inference backends the jobs used."""
    engine = create_engine(db_url)
    with engine.connect() as conn:
        timeline = {r["study_instance_uid"]: dict(r) for r in conn.execute(text(
            "SELECT study_instance_uid, job_id, quiet_s, wait_s, processing_s, delivery_s, total_s "
            "FROM v_study_timeline WHERE is_current = 1")).mappings()}
        succeeded = {r["job_id"]: json.loads(r["detail"]) for r in conn.execute(text(
            "SELECT job_id, detail FROM events WHERE kind = 'job_succeeded'")).mappings()}
    engine.dispose()
    timings = {job: detail.get("timings", {}) for job, detail in succeeded.items()}
    backends = sorted({str(detail.get("backend")) for detail in succeeded.values()})
    out = []
    for rate, uids in by_rate.items():
        rows = []
        for uid in uids:
            t = timeline.get(uid)
            if t is None or t["total_s"] is None:
                continue
            step = timings.get(t["job_id"], {})
            row = {k: float(t[k]) for k in ("quiet_s", "wait_s", "processing_s", "delivery_s", "total_s")}
            row["images"] = succeeded.get(t["job_id"], {}).get("images", 0)
            row["prepared"] = step.get("prepared", 0)
            row.update({k: float(step.get(k, np.nan)) for k in ("decode_s", "inference_s", "build_s")})
            row["other_s"] = row["processing_s"] - row["decode_s"] - row["inference_s"] - row["build_s"]
            rows.append(row)
        keys = (*STAGES, "processing_s", "total_s")
        out.append({"rate_per_s": rate, "studies": len(rows),
                    "images": sum(r["images"] for r in rows), "prepared": sum(r["prepared"] for r in rows),
                    "median": {k: _pct([r[k] for r in rows], 50) for k in keys},
                    "p95": {k: _pct([r[k] for r in rows], 95) for k in keys}})
    return out, backends


# --- report ------------------------------------------------------------------------------------------


def _plot(report: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no plot was drawn (pip install matplotlib to get one)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rates = [r["rate_per_s"] for r in report["rates"]]
    for key, marker in (("p50_s", "o"), ("p95_s", "s"), ("p99_s", "^")):
        ax1.plot(rates, [r[key] for r in report["rates"]], marker=marker, label=key[:-2])
    ax1.axhline(2.0, color="grey", linestyle="--", label="target p95 at 1/s")
    ax1.set(xscale="log", xlabel="studies per second", ylabel="seconds beyond the quiet period",
            title="time to result (last ack -> SR at destination)")
    ax1.set_xticks(rates, [f"{r:g}" for r in rates])
    ax1.minorticks_off()
    ax1.legend()
    bottom = np.zeros(len(rates))
    for stage in STAGES:
        values = np.array([s["median"][stage] or 0.0 for s in report["stages"]])
        ax2.bar([f"{r:g}/s" for r in rates], values, bottom=bottom, label=stage[:-2])
        bottom += values
    ax2.set(ylabel="seconds (median per stage)", title="ledger stages, last instance received -> delivered")
    ax2.legend(fontsize=8)
    fig.suptitle(f"Pleura production stack on {report['host']['name']} ({report['host']['cpu_count']} CPUs), "
                 f"{report['studies']['images_per_study']} image(s)/study, {report['studies']['transfer_syntax']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="0.25,0.5,1,1.5,2", help="studies per second, comma-separated")
    parser.add_argument("--studies", type=int, default=20, help="studies per rate")
    parser.add_argument("--images", type=int, default=1, help="images per study")
    parser.add_argument("--pool", type=int, default=8, help="distinct images synthesized (reused with new UIDs)")
    parser.add_argument("--quiet", type=float, default=1.0, help="PLEURA_STUDY_QUIET_SECONDS")
    parser.add_argument("--sweep", type=float, default=0.2, help="PLEURA_SWEEP_INTERVAL_SECONDS")
    parser.add_argument("--transfer-syntax", default="j2k", choices=["explicit", "j2k", "rle", "jpegls"])
    parser.add_argument("--drain", type=float, default=60, help="seconds to wait for the last SRs of a rate")
    parser.add_argument("--nih", type=Path, default=NIH)
    parser.add_argument("--pg-admin", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rabbitmq-host", default="127.0.0.1:5672")
    parser.add_argument("--backend", default="auto", help="PLEURA_BACKEND of the worker")
    parser.add_argument("--storage", default="local", choices=["local", "database"], help="PLEURA_STORAGE")
    parser.add_argument("--name", default="time_to_result", help="stem of the JSON and PNG written")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    started, machine = time.time(), host()

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pleura-ttr-")))
        print(f"synthesizing {args.pool} images ({args.transfer_syntax})", flush=True)
        pool = templates(args.nih, args.pool, args.transfer_syntax, tmp / "pool")
        db_url = stack.enter_context(postgres_db(args.pg_admin))
        broker = stack.enter_context(rabbitmq_vhost(args.rabbitmq_host))
        dest_port, dest = start_destination(stack, tmp)
        port = free_port()
        env = {"PLEURA_DATA_DIR": str(tmp / "var"), "PLEURA_DATABASE_URL": db_url, "PLEURA_BROKER_URL": broker,
               "PLEURA_DICOM_PORT": str(port), "PLEURA_DESTINATIONS": f"DEST@127.0.0.1:{dest_port}",
               "PLEURA_STUDY_QUIET_SECONDS": str(args.quiet), "PLEURA_SWEEP_INTERVAL_SECONDS": str(args.sweep),
               "PLEURA_MIN_FREE_DISK_MB": "20", "PLEURA_BACKEND": args.backend, "PLEURA_STORAGE": args.storage}
        start_production(stack, env, tmp)
        try:
            warm = run_rate(port, dest, pool, 1.0, 2, args.images, args.quiet, 120, 0)  # model load, connections
            if warm["received"] < 2:
                raise RuntimeError("warm-up studies got no results")
            results = []
            for i, rate in enumerate(rates):
                print(f"rate {rate:g}/s: {args.studies} studies", flush=True)
                results.append(run_rate(port, dest, pool, rate, args.studies, args.images, args.quiet, args.drain,
                                        i))
                r = results[-1]
                print(f"  received {r['received']}/{r['studies']} p50 {r['p50_s']} p95 {r['p95_s']} "
                      f"p99 {r['p99_s']} growth {r['growth_s']} sustainable {r['sustainable']}", flush=True)
                time.sleep(args.quiet + 2)  # stragglers settle before the next rate
            stage_rows, backends = stages(db_url, {r["rate_per_s"]: r["study_uids"] for r in results})
        except BaseException:
            for log in ("listen.log", "worker.log"):
                print(f"--- {log}\n" + "\n".join((tmp / log).read_text(errors="replace").splitlines()[-40:]))
            raise

    sustainable = [r["rate_per_s"] for r in results if r["sustainable"]]
    at_one = next((r for r in results if r["rate_per_s"] == 1.0), None)
    report: dict[str, Any] = {
        "benchmark": "time_to_result",
        "command": " ".join([".venv/bin/python -m bench.time_to_result", *(argv or sys.argv[1:])]),
        "host": machine,
        "stack": {"database": "PostgreSQL (fresh database, shared server)", "broker": "RabbitMQ (fresh vhost)",
                  "listener": "pleura listen", "worker": "pleura worker (1 process, default concurrency)",
                  "destination": "DCMTK storescp", "model": "demo bundle (PLEURA_MODEL default)",
                  "backend_setting": args.backend, "backends_used": backends, "storage": args.storage,
                  "quiet_s": args.quiet, "sweep_interval_s": args.sweep},
        "studies": {"source": "NIH ChestX-ray14 sample via pleura synth, full original matrix, 12-bit CR",
                    "transfer_syntax": args.transfer_syntax, "images_per_study": args.images,
                    "distinct_images": len(pool), "per_rate": args.studies,
                    "matrix": sorted({f"{ds.Columns}x{ds.Rows}" for ds in pool})},
        "definition": "SR file mtime at storescp - last C-STORE response at the sender - quiet period",
        "rates": [{k: v for k, v in r.items() if k != "study_uids"} for r in results],
        "stages": stage_rows,
        "highest_sustainable_rate_per_s": max(sustainable) if sustainable else None,
        "target_p95_under_2s_at_1_per_s": None if at_one is None else bool(at_one["p95_s"] is not None
                                                                             and at_one["received"] == at_one["studies"]
                                                                             and at_one["p95_s"] < 2.0),
        "wall_s": round(time.time() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{args.name}.png"
    note = _plot(report, png)
    report["plot"] = None if note else png.name
    if note:
        report["plot_note"] = note
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("highest_sustainable_rate_per_s", "target_p95_under_2s_at_1_per_s",
                                              "wall_s")}))
    return report


if __name__ == "__main__":
    main()
