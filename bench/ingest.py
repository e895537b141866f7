"""Ingest throughput: Pleura's listener against DCMTK storescp and Orthanc, same files, same machine.

    .venv/bin/python -m bench.ingest [--files 32] [--syntaxes explicit,j2k,jpegls] [--associations 1,4]
        [--receivers pleura,storescp,orthanc] [--repeats 3] [--pg-admin URL] [--rabbitmq-host 127.0.0.1:5672]
        [--listen-processes CPUS] [--data build/ingest-data] [--out bench/results]
    .venv/bin/python -m bench.ingest --quick     # under a minute: the figure to give after touching the receive path
    .venv/bin/python -m bench.ingest --syntaxes explicit --receivers pleura-stow,orthanc-stow,pleura   # STOW-RS

``--quick`` is ``--files 24 --syntaxes explicit --associations 4 --receivers pleura,storescp,orthanc
--repeats 3 --out build/bench --name ingest-quick``, and ends with one line of ratios.

Data: ``--files`` chest X-rays from the shared NIH sample written by ``pleura synth`` at their original
matrix size (about 2500 x 2500, 12-bit, one instance per file) in each transfer syntax (``explicit``:
Explicit VR Little Endian, ``j2k``: JPEG 2000 lossless, ``jpegls``: JPEG-LS lossless); generated once
into ``--data`` and reused. Sender: DCMTK ``dcmsend -dn`` (each file in its own transfer syntax, never
decompressed), one process per association, the files split evenly among them. Receivers, each started
fresh for every run, on free ports of 127.0.0.1: ``pleura`` (and ``pleura-db``, the same with
``PLEURA_STORAGE=database``: each instance's bytes copied into ``blob_chunks`` rows in the transaction
of its ledger row, the spool copy then removed) is ``pleura listen --no-sweeper`` in production mode
with ``--listen-processes`` processes accepting on the port (``PLEURA_LISTEN_PROCESSES``; default: one
per CPU, as Orthanc's threads and ``storescp``'s forks use every core) (ledger on a fresh PostgreSQL
database at ``--pg-admin``, migrated with ``pleura db upgrade``; a fresh RabbitMQ virtual host on
``--rabbitmq-host`` takes the prepare-on-arrival hints it publishes, which nothing consumes here), which
fsyncs each file and commits its ledger row before answering Success; ``storescp`` is DCMTK's ``storescp
--fork +xa -od DIR`` (a process per association, no fsync); ``orthanc`` is Orthanc with its default
SQLite index and file storage. ``pleura-stow`` and ``orthanc-stow`` are the same two receivers taking
the files by DICOMweb STOW-RS instead (Pleura: ``PLEURA_DICOMWEB_PORT`` with a bearer token, each part
fsynced and recorded before the answer; Orthanc: its DICOMweb plugin); their sender is one thread
per client (``--associations`` clients) in this process, each POSTing its files ``--stow-parts`` to a
request (default one: a request per file; parts of ``multipart/related`` streamed from the files in 1
MiB pieces) over one kept-alive HTTP connection. Each receiver first gets ``WARM_UP_FILES`` other files
over the same number of associations, not timed: start-up costs (imports, connection pools, caches) are
not what a PACS meets. Timed: from starting the senders to the last sender's exit. Afterwards the count
of instances kept is checked against the count sent (warm-up included: ledger rows, files, Orthanc's
/statistics); a run that falls short fails the benchmark. MB/s counts file bytes (10^6). Each case runs
``--repeats`` times; the median wall time is reported, with ratios Pleura/storescp and Pleura/Orthanc."""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.common import free_port, host, postgres_db, process, rabbitmq_vhost, wait_port

PLEURA = str(Path(sys.executable).with_name("pleura"))
NIH = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14-sample"
RECEIVERS = ("pleura", "pleura-db", "storescp", "orthanc", "pleura-stow", "orthanc-stow")
#: receivers that take the files by DICOMweb STOW-RS (``send_stow``); the others by C-STORE (``send``)
STOW = ("pleura-stow", "orthanc-stow")
STOW_TOKEN = "bench-token"
_STOW_PIECE = 1 << 20
#: Files sent (over the run's number of associations) to each fresh receiver before the timed send,
#: so that start-up costs (imports, connection pools, caches) are not counted: a PACS's peer runs for months.
WARM_UP_FILES = 4
SYNTAX_NAMES = {"explicit": "Explicit VR LE", "j2k": "JPEG 2000 lossless", "jpegls": "JPEG-LS lossless"}


def _wait_listening(processes: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    """Until ``processes`` listener processes have logged that they serve the port."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count('"event": "listening"') < processes:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"not {processes} listener processes:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


# --- data ------------------------------------------------------------------------------------------


def dataset(cache: Path, syntax: str, files: int) -> list[Path]:
    """``files`` full-size chest X-rays in ``syntax``, generated into ``cache/syntax`` unless already there."""
    folder = cache / f"{syntax}-{files}"
    if not folder.is_dir() or len(list(folder.glob("*.dcm"))) < files:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"generating {files} {syntax} files into {folder}", file=sys.stderr, flush=True)
        subprocess.run([PLEURA, "synth", "--images", str(NIH / "images"), "--labels", str(NIH / "labels.csv"),
                        "--out", str(folder), "--limit", str(files), "--transfer-syntax", syntax],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return sorted(folder.glob("*.dcm"))[:files]


# --- receivers: each yields (port, called AE, count of instances kept) ------------------------------


Receiver = Iterator[tuple[int, str, Callable[[], int]]]


@contextmanager
def pleura(workdir: Path, pg_admin: str, rabbitmq_host: str, processes: int, storage: str = "local",
           on_start: Callable[[subprocess.Popen], None] | None = None, stow: bool = False) -> Receiver:
    """``on_start`` gets the listener's process once all its processes serve the port (bench.ingest_profile);
    with ``stow`` the port yielded is that of STOW-RS (``PLEURA_DICOMWEB_PORT``)."""
    with postgres_db(pg_admin, "pleura_ingest") as url, rabbitmq_vhost(rabbitmq_host) as broker:
        port, http_port = free_port(), free_port()
        env = {"PLEURA_DATA_DIR": str(workdir / "var"), "PLEURA_DATABASE_URL": url, "PLEURA_BROKER_URL": broker,
               "PLEURA_DICOM_HOST": "127.0.0.1", "PLEURA_DICOM_PORT": str(port), "PLEURA_MIN_FREE_DISK_MB": "20",
               "PLEURA_LISTEN_PROCESSES": str(processes), "PLEURA_STORAGE": storage}
        if stow:
            (workdir / "tokens").write_text(f"BENCH:{STOW_TOKEN}\n")
            env |= {"PLEURA_DICOMWEB_PORT": str(http_port), "PLEURA_DICOMWEB_HOST": "127.0.0.1",
                    "PLEURA_DICOMWEB_TOKEN_FILE": str(workdir / "tokens")}
        log, ledger = workdir / "pleura.log", create_engine(url)

        def count() -> int:
            with ledger.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM instances")).scalar() or 0)

        try:
            subprocess.run([PLEURA, "db", "upgrade"], env={**os.environ, **env}, check=True, capture_output=True)
            with process([PLEURA, "listen", "--no-sweeper"], log, env) as proc:
                wait_port(port, proc, log)
                _wait_listening(processes, proc, log)  # the port opens before they all serve it
                if stow:
                    wait_port(http_port, proc, log)
                if on_start is not None:
                    on_start(proc)
                yield (http_port if stow else port), "PLEURA", count
        finally:
            ledger.dispose()


@contextmanager
def storescp(workdir: Path) -> Receiver:
    port, out = free_port(), workdir / "storescp"
    out.mkdir()
    log = workdir / "storescp.log"
    with process(["storescp", "--fork", "+xa", "-aet", "STORESCP", "-od", str(out), str(port)], log) as proc:
        wait_port(port, proc, log)
        yield port, "STORESCP", lambda: sum(1 for p in out.iterdir() if p.is_file())


@contextmanager
def orthanc(workdir: Path, stow: bool = False) -> Receiver:
    """With ``stow`` the DICOMweb plugin is loaded and the port yielded is the HTTP one."""
    http_port, port = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
              "HttpPort": http_port, "DicomPort": port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "HttpServerEnabled": True, "DicomServerEnabled": True,
              "Plugins": [str(_dicomweb_plugin())] if stow else [],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (workdir / "orthanc.json").write_text(json.dumps(config))

    def count() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics", timeout=30) as response:
            return int(json.loads(response.read())["CountInstances"])

    log = workdir / "orthanc.log"
    with process(["Orthanc", str(workdir / "orthanc.json")], log) as proc:
        wait_port(http_port, proc, log)
        wait_port(port, proc, log)
        yield (http_port if stow else port), "ORTHANC", count


def _dicomweb_plugin() -> Path:
    """Orthanc's DICOMweb plugin (Debian's ``orthanc-dicomweb``)."""
    for pattern in ("usr/share/orthanc/plugins/libOrthancDicomWeb.so", "usr/lib/orthanc/libOrthancDicomWeb.so*"):
        if found := sorted(Path("/").glob(pattern)):
            return found[0]
    raise RuntimeError("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")


# --- one run ---------------------------------------------------------------------------------------


def send(port: int, called_ae: str, files: list[Path], associations: int) -> float:
    """dcmsend ``files`` over ``associations`` parallel processes; seconds until the last one exits."""
    parts = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen(["dcmsend", "-aet", "BENCH", "-aec", called_ae, "-dn", "-nh", "127.0.0.1", str(port),
                               *map(str, part)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for part in parts if part]
    errors = [p.communicate(600)[1] for p in procs]
    wall = time.perf_counter() - started
    failed = [e.decode(errors="replace")[-500:] for p, e in zip(procs, errors, strict=True) if p.returncode]
    if failed:
        raise RuntimeError(f"dcmsend failed: {failed[0]}")
    return wall


def send_stow(port: int, files: list[Path], clients: int, token: str | None, per_request: int = 1) -> float:
    """POST ``files`` to ``/dicom-web/studies``, ``per_request`` parts a request, from ``clients`` threads
    each on one kept-alive connection; seconds until the last one is answered. Any answer but 200 fails
    the run."""
    failures: list[str] = []

    def client(part: list[Path]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            for start in range(0, len(part), per_request):
                batch, boundary = part[start:start + per_request], uuid.uuid4().hex
                head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                between = f"\r\n{head.decode()}".encode()
                tail = f"\r\n--{boundary}--\r\n".encode()
                size = len(head) + (len(batch) - 1) * len(between) + len(tail) + sum(p.stat().st_size for p in batch)
                headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                           "Accept": "application/dicom+json", "Content-Length": str(size)}
                if token:
                    headers["Authorization"] = f"Bearer {token}"
                conn.request("POST", "/dicom-web/studies", body=_pieces(head, between, batch, tail), headers=headers)
                answer = conn.getresponse()
                body = answer.read()
                if answer.status != 200:
                    failures.append(f"{answer.status}: {body[:300]!r}")
                    return
        finally:
            conn.close()

    parts = [files[i::clients] for i in range(clients)]
    threads = [threading.Thread(target=client, args=(part,)) for part in parts if part]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"STOW-RS failed: {failures[0]}")
    return wall


def _pieces(head: bytes, between: bytes, paths: list[Path], tail: bytes) -> Iterator[bytes]:
    """A multipart body read from the files piece by piece as it is sent."""
    for n, path in enumerate(paths):
        yield between if n else head
        with path.open("rb") as fh:
            while piece := fh.read(_STOW_PIECE):
                yield piece
    yield tail


def run_once(receiver: str, files: list[Path], warm_up: list[Path], associations: int,
             args: argparse.Namespace) -> float:
    with tempfile.TemporaryDirectory(prefix="pleura-ingest-", dir=args.tmp) as tmp:
        workdir = Path(tmp)
        start = {"pleura": lambda: pleura(workdir, args.pg_admin, args.rabbitmq_host, args.listen_processes),
                 "pleura-db": lambda: pleura(workdir, args.pg_admin, args.rabbitmq_host, args.listen_processes,
                                             "database"),
                 "pleura-stow": lambda: pleura(workdir, args.pg_admin, args.rabbitmq_host, args.listen_processes,
                                               stow=True),
                 "storescp": lambda: storescp(workdir), "orthanc": lambda: orthanc(workdir),
                 "orthanc-stow": lambda: orthanc(workdir, stow=True)}[receiver]
        with start() as (port, called_ae, count):
            if receiver in STOW:
                token = STOW_TOKEN if receiver.startswith("pleura") else None
                send_stow(port, warm_up, associations, token, args.stow_parts)
                wall = send_stow(port, files, associations, token, args.stow_parts)
            else:
                send(port, called_ae, warm_up, associations)
                wall = send(port, called_ae, files, associations)
            kept = count()
        if kept != len(files) + len(warm_up):
            raise RuntimeError(f"{receiver} kept {kept} of {len(files) + len(warm_up)} instances")
        return wall


def measure(syntax: str, files: list[Path], warm_up: list[Path], associations: int, receiver: str,
            args: argparse.Namespace) -> dict:
    size = sum(p.stat().st_size for p in files)
    walls = []
    for _ in range(args.repeats):
        walls.append(run_once(receiver, files, warm_up, associations, args))
        print(f"  {receiver:8} {syntax:8} x{associations}: {walls[-1]:.2f} s", file=sys.stderr, flush=True)
    wall = statistics.median(walls)
    return {"receiver": receiver, "syntax": syntax, "associations": associations, "files": len(files),
            "megabytes": round(size / 1e6, 1), "wall_seconds": [round(w, 3) for w in walls],
            "median_seconds": round(wall, 3), "mb_per_s": round(size / 1e6 / wall, 1),
            "instances_per_s": round(len(files) / wall, 2)}


def ratios(runs: list[dict]) -> list[dict]:
    by = {(r["receiver"], r["syntax"], r["associations"]): r["mb_per_s"] for r in runs}
    out = []
    for (receiver, syntax, assoc), rate in by.items():
        if not receiver.startswith("pleura"):
            continue
        row: dict[str, Any] = {"receiver": receiver, "syntax": syntax, "associations": assoc}
        for other in ("storescp", "orthanc", "orthanc-stow") + (("pleura",) if receiver != "pleura" else ()):
            if (other, syntax, assoc) in by:
                row[f"{receiver.replace('-', '_')}_over_{other.replace('-', '_')}"] = round(
                    rate / by[(other, syntax, assoc)], 2)
        out.append(row)
    return out


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report["plot_note"] = "matplotlib is not installed: no plot"
        return
    assocs = sorted({r["associations"] for r in report["runs"]})
    syntaxes = list(dict.fromkeys(r["syntax"] for r in report["runs"]))
    receivers = [r for r in RECEIVERS if any(x["receiver"] == r for x in report["runs"])]
    fig, axes = plt.subplots(1, len(assocs), figsize=(5.5 * len(assocs), 4.2), squeeze=False, sharey=True)
    width = 0.8 / max(len(receivers), 1)
    for ax, assoc in zip(axes[0], assocs, strict=True):
        for i, receiver in enumerate(receivers):
            values = [next((r["mb_per_s"] for r in report["runs"] if (r["receiver"], r["syntax"],
                            r["associations"]) == (receiver, s, assoc)), 0) for s in syntaxes]
            bars = ax.bar([x + i * width for x in range(len(syntaxes))], values, width, label=receiver)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks([x + width * (len(receivers) - 1) / 2 for x in range(len(syntaxes))],
                      [SYNTAX_NAMES.get(s, s) for s in syntaxes], fontsize=8)
        ax.set_title(f"{assoc} association{'s' if assoc > 1 else ''} or STOW-RS client{'s' if assoc > 1 else ''}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("MB/s of DICOM files received")
    axes[0][0].legend()
    fig.suptitle(f"Ingest, {report['runs'][0]['files']} full-size chest X-rays, median of {report['repeats']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _versions() -> dict[str, str]:
    def first_line(*cmd: str) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        return lines[0].strip("$ ") if lines else "?"

    versions = {p: importlib.metadata.version(p) for p in ("pynetdicom", "pydicom", "sqlalchemy")}
    versions.update(python=platform.python_version(), dcmtk=first_line("storescp", "--version"),
                    orthanc=first_line("Orthanc", "--version"))
    return versions


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--syntaxes", default="explicit,j2k,jpegls")
    parser.add_argument("--associations", default="1,4")
    parser.add_argument("--receivers", default=",".join(RECEIVERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pg-admin", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rabbitmq-host", default="127.0.0.1:5672")
    parser.add_argument("--listen-processes", type=int, default=os.cpu_count() or 1,
                        help="PLEURA_LISTEN_PROCESSES of Pleura's listener (default: the CPU count)")
    parser.add_argument("--data", type=Path, default=Path("build/ingest-data"))
    parser.add_argument("--tmp", type=Path, default=None, help="where receivers store (default: system temp)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="ingest", help="stem of the JSON and PNG written")
    parser.add_argument("--stow-parts", type=int, default=1,
                        help="instances a STOW-RS request carries (default 1: a request per file)")
    parser.add_argument("--quick", action="store_true", help="explicit VR, 4 associations, 24 files: under a minute")
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.syntaxes, args.associations, args.repeats = 24, "explicit", "4", 3
        args.receivers, args.out, args.name = "pleura,storescp,orthanc", Path("build/bench"), "ingest-quick"
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.ingest", *(argv if argv is not None else sys.argv[1:])]),
        "method": __doc__.split("\n\n", 2)[2].strip().replace("\n", " "),
        "host": host(),
        "versions": _versions(), "repeats": args.repeats, "pleura_listen_processes": args.listen_processes,
        "stow_parts_per_request": args.stow_parts,
        "runs": [],
    }
    for syntax in args.syntaxes.split(","):
        files = dataset(args.data, syntax, args.files + WARM_UP_FILES)
        files, warm_up = files[:args.files], files[args.files:]
        for assoc in (int(a) for a in args.associations.split(",")):
            for receiver in args.receivers.split(","):
                report["runs"].append(measure(syntax, files, warm_up, assoc, receiver, args))
    report["ratios"] = ratios(report["runs"])
    args.out.mkdir(parents=True, exist_ok=True)
    plot(report, args.out / f"{args.name}.png")
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["host"]["load_average_1m_at_end"] = os.getloadavg()[0]
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    for row in report["ratios"]:
        print(json.dumps(row), file=sys.stderr)
    if args.quick:
        rates = {r["receiver"]: r["mb_per_s"] for r in report["runs"]}
        print(f"quick: pleura {rates['pleura']} MB/s, {rates['pleura'] / rates['storescp']:.2f}x storescp, "
              f"{rates['pleura'] / rates['orthanc']:.2f}x Orthanc (explicit VR, 4 associations, median of 3)",
              file=sys.stderr)
    print(f"[{report['wall_seconds']} s] wrote {args.out / args.name}.json and .png", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
