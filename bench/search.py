"""Search latency of the embedding archive: SQLite and PostgreSQL exact search, PostgreSQL 16 + pgvector HNSW.

    .venv/bin/python -m bench.search [--sizes 1000,10000,50000] [--data demo|gaussian] [--dims 160]
        [--queries 100] [--seconds 5] [--backends sqlite,postgresql,pgvector] [--pg-admin URL] [--out bench/results]

For each backend the archive grows to each size in turn (vectors drawn as ``--data`` says, see
:class:`Data`; one image per study, one ``EmbeddingArchive.store`` call per study as the pipeline
makes one per job, 500 studies per transaction; the study/job/instance rows are bulk-inserted
beforehand, untimed). At each size, after ``ANALYZE`` on PostgreSQL (what autovacuum does after
a bulk load), it times ``nearest`` (a fresh vector) and ``like`` (a stored study's UID) with
limit 10: ``--queries`` of each, fewer if they take longer than ``--seconds``, after 3 warm-up
calls. recall@10 is the overlap of the 10 studies found with those of a brute-force numpy search
over the same float32 unit vectors (what the exact backend computes, so exact runs must show
1.0). pgvector searches with the archive's default ``hnsw.ef_search`` (``PLEURA_SEARCH_EF_SEARCH``,
400); its recall and latency for ``nearest`` are also measured at ``ef_search`` 40 (pgvector's own
default), 100, 200 and 1000.

Backends: ``sqlite`` (a temporary file), ``postgresql`` (the server at ``--pg-admin``, in a
fresh database ``pleura_bench_<hex>`` dropped afterwards; exact unless it has pgvector), and
``pgvector`` (a private PostgreSQL 16 cluster from the ``pgserver`` wheel, which bundles
pgvector; started in a temporary directory and removed afterwards). Writes ``search.json`` and
``search.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, event, insert, text
from sqlalchemy.exc import OperationalError

from bench.common import free_port, host, postgres_db
from worker.embeddings import EXACT, EmbeddingArchive
from worker.embeddings.search import DEFAULT_EF_SEARCH
from worker.embeddings.vectors import unit
from worker.ledger import Instance, Job, Study
from worker.ledger.db import Ledger, upgrade, utcnow

BUNDLE = ("bench", "1")
K = 10
CHUNK = 500  # studies per transaction while loading
EF_SWEEP = (40, 100, 200, 1000)  # other hnsw.ef_search values timed for pgvector (40: pgvector's default)


# --- the three databases ---------------------------------------------------------------------------


@contextmanager
def sqlite_db() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="pleura-bench-") as tmp:
        yield f"sqlite:///{tmp}/ledger.db"


def pgserver_bin() -> Path:
    """pgserver's PostgreSQL binaries, found without importing the package."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pgserver is not installed (pip install -e '.[test]')")
    return Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"


@contextmanager
def pgvector_db() -> Iterator[str]:
    """A private PostgreSQL 16 cluster with pgvector (as user ``postgres`` when run as root: it refuses root).

    Stock settings (fsync on), like the shared server, so that insert times compare.
    """
    bin_dir = pgserver_bin()
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="pleura-bench-pg-"))
    if as_user:
        shutil.chown(home, "postgres")
    port = free_port()

    def run(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, check=False)
        if done.returncode:
            raise RuntimeError(f"{Path(args[0]).name} failed: {done.stderr.strip()}")

    try:
        run(str(bin_dir / "initdb"), "-D", str(home / "data"), "-A", "trust", "-U", "postgres")
        run(str(bin_dir / "pg_ctl"), "-D", str(home / "data"), "-l", str(home / "pg.log"), "-w", "start",
            "-o", f"-p {port} -k {home} -c listen_addresses=127.0.0.1")
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "pleura")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/pleura"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(home / "data"), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=120, check=False)
        shutil.rmtree(home, ignore_errors=True)


# --- what is stored --------------------------------------------------------------------------------


DATA = {
    "demo": ("Gaussian with the mean and covariance of the demo bundle's 160-d embeddings of the 490 NIH sample "
             "images: about as concentrated as this encoder's real embeddings"),
    "gaussian": "isotropic standard Gaussian: no structure at all, the worst case for HNSW",
}


class Data:
    """Vectors to store and query, as :data:`DATA` describes them."""

    def __init__(self, kind: str, dim: int, nih: Path, cache: Path) -> None:
        self.kind, self.dim = kind, dim
        if kind == "demo":
            from worker.heads.labelled import embed, read_labels
            from worker.settings import load_settings

            if not (nih / "labels.csv").is_file():
                raise SystemExit(f"--data demo needs the NIH sample at {nih} (--nih); or use --data gaussian")
            table = read_labels(nih / "labels.csv", nih / "images")
            _, x, _ = embed(load_settings(None), "demo", "auto", table, cache, progress=lambda *_: None)
            if dim != x.shape[1]:
                raise SystemExit(f"--data demo has the demo bundle's {x.shape[1]} dimensions, not {dim}; "
                                 "use --data gaussian for other --dims")
            self.mean, self.cov = x.mean(axis=0), np.cov(x, rowvar=False)
        elif kind not in DATA:
            raise SystemExit(f"unknown --data {kind!r}: {' or '.join(DATA)}")

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "gaussian":
            return rng.normal(size=(n, self.dim)).astype(np.float32)
        return rng.multivariate_normal(self.mean, self.cov, size=n, method="eigh").astype(np.float32)

    def describe(self, rng: np.random.Generator) -> dict[str, Any]:
        """The kind and the effective dimension (participation ratio) of the unit vectors' covariance."""
        units = np.stack([unit(v) for v in self.draw(5000, rng)])
        spectrum = np.linalg.eigvalsh(np.cov(units, rowvar=False))
        return {"kind": self.kind, "dim": self.dim, "description": DATA[self.kind],
                "effective_dimension": round(float(spectrum.sum() ** 2 / (spectrum ** 2).sum()), 1)}


# --- loading and timing ----------------------------------------------------------------------------


def uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.10.1099.{n}"


def load(ledger: Ledger, archive: EmbeddingArchive, vectors: np.ndarray, start: int) -> float:
    """Store ``vectors[start:]`` as studies ``start + 1``... (one image each); seconds spent in ``store``."""
    now = utcnow()
    ids = range(start + 1, len(vectors) + 1)
    with ledger.session() as s:  # ids given, so no RETURNING round trip per row
        s.execute(insert(Study), [{"id": i, "study_instance_uid": uid(i), "state": "DONE", "revision": 1,
                                   "first_received_at": now, "last_received_at": now} for i in ids])
        s.execute(insert(Job), [{"id": i, "study_id": i, "revision": 1, "state": "SUCCEEDED", "created_at": now,
                                 "attempts": 1} for i in ids])
        s.execute(insert(Instance), [{"id": i, "study_id": i, "sop_instance_uid": uid(i) + ".1",
                                      "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1", "series_instance_uid": uid(i),
                                      "transfer_syntax_uid": "1.2.840.10008.1.2.1", "spool_path": "-",
                                      "size_bytes": 0, "sha256": "0" * 64, "received_at": now} for i in ids])
    spent = 0.0
    for lo in range(start, len(vectors), CHUNK):
        t0 = time.perf_counter()
        with ledger.session() as s:
            for i in range(lo, min(lo + CHUNK, len(vectors))):
                archive.store(s, job_id=i + 1, study_id=i + 1, bundle_name=BUNDLE[0], bundle_version=BUNDLE[1],
                              vectors=[(i + 1, vectors[i])], now=now)
        spent += time.perf_counter() - t0
    if ledger.engine.dialect.name == "postgresql":
        with ledger.engine.connect() as conn:
            conn.execute(text("ANALYZE embeddings"))
            conn.commit()
    return spent


def timed(calls: list[Callable[[], Any]], seconds: float) -> tuple[dict[str, float], list[Any]]:
    """p50/p95 (ms) of ``calls`` run in turn (at least 10, stopping after ``seconds``), and their results."""
    for call in calls[:3]:
        call()
    latencies, results = [], []
    started = time.perf_counter()
    for call in calls:
        if len(latencies) >= 10 and time.perf_counter() - started > seconds:
            break
        t0 = time.perf_counter()
        results.append(call())
        latencies.append(time.perf_counter() - t0)
    ms = np.asarray(latencies) * 1000
    return {"queries": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2)}, results


def recall(hits: list[Any], truth: np.ndarray) -> float:
    return len({h.study_instance_uid for h in hits} & {uid(int(i) + 1) for i in truth}) / K


def top_k(units: np.ndarray, query: np.ndarray, leave_out: int | None = None) -> np.ndarray:
    """Indexes of the ``K`` best cosines (``units`` and ``query`` unit float32), ``leave_out`` excluded."""
    scores = units @ query
    if leave_out is not None:
        scores[leave_out] = -np.inf
    return np.argpartition(-scores, K)[:K]


def wider(ledger: Ledger, units: np.ndarray, fresh: np.ndarray, seconds: float) -> list[dict[str, Any]]:
    """pgvector's recall@10 and latency of ``nearest`` (limit 10) at other ``hnsw.ef_search`` values."""
    rows = []
    for ef_search in EF_SWEEP:
        archive = EmbeddingArchive(ledger, ef_search=ef_search)
        stats, results = timed([lambda v=v, a=archive: a.nearest(v, *BUNDLE, limit=K) for v in fresh], seconds)
        found = [recall(r.hits, top_k(units, unit(v))) for v, r in zip(fresh, results, strict=False)]
        rows.append({"ef_search": ef_search, **stats, "recall_at_10": round(float(np.mean(found)), 4)})
    return rows


def uses_index(ledger: Ledger, archive: EmbeddingArchive, vector: np.ndarray) -> str:
    """The first line of the plan with an index for ``nearest``'s vector search statement."""
    seen: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if "<=>" in statement:
            seen.append((statement, parameters))

    event.listen(ledger.engine, "before_cursor_execute", record)
    try:
        archive.nearest(vector, *BUNDLE, limit=K)
    finally:
        event.remove(ledger.engine, "before_cursor_execute", record)
    with ledger.engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN " + seen[0][0], seen[0][1]).scalars().all()
    return next((line.strip().lstrip("-> ") for line in plan if "Index" in line), "no index: " + plan[0])


def measure(name: str, url: str, sizes: list[int], data: Data, queries: int, seconds: float,
            seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    vectors = data.draw(max(sizes), rng)
    units = np.stack([unit(v) for v in vectors])  # as the archive stores them
    dim = data.dim
    upgrade(url)
    ledger = Ledger(url)
    archive = EmbeddingArchive(ledger)
    run: dict[str, Any] = {"backend": name, "archive_backend": archive.backend, "describe": archive.describe(),
                           "data": data.kind, "dim": dim, "points": []}
    try:
        stored = 0
        for size in sizes:
            spent = load(ledger, archive, vectors[:size], stored)
            point: dict[str, Any] = {"n": size, "insert_s": round(spent, 2),
                                     "insert_ms_per_embedding": round(1000 * spent / (size - stored), 3)}
            stored = size
            fresh = data.draw(queries, rng)
            picked = rng.choice(size, queries, replace=False)
            point["nearest"], near = timed([lambda v=v: archive.nearest(v, *BUNDLE, limit=K) for v in fresh], seconds)
            point["like"], like = timed([lambda i=i: archive.like(uid(int(i) + 1), limit=K) for i in picked], seconds)
            found = [recall(r.hits, top_k(units[:size], unit(v))) for v, r in zip(fresh, near, strict=False)]
            found += [recall(r.hits, top_k(units[:size], units[i], leave_out=i)) for i, r in zip(picked, like,
                                                                                               strict=False)]
            point["recall_at_10"] = {"mean": round(float(np.mean(found)), 4), "min": float(min(found)),
                                     "queries": len(found)}
            if archive.backend != EXACT:
                point["plan"] = uses_index(ledger, archive, fresh[0])
                point["wider"] = wider(ledger, units[:size], fresh, seconds)
            print(f"  {name:<10} d={dim} n={size:>6}: insert {point['insert_ms_per_embedding']:6.2f} ms/embedding; "
                  f"nearest p50 {point['nearest']['p50_ms']:7.2f} ms p95 {point['nearest']['p95_ms']:7.2f}; "
                  f"like p50 {point['like']['p50_ms']:7.2f} ms p95 {point['like']['p95_ms']:7.2f}"
                  + f"; recall@10 {point['recall_at_10']['mean']:.3f}",
                  file=sys.stderr, flush=True)
            run["points"].append(point)
    finally:
        ledger.close()
    return run


# --- report ----------------------------------------------------------------------------------------


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (near, like), (store, found) = axes
    for run in report["runs"]:
        n = [p["n"] for p in run["points"]]
        label = f"{run['backend']} ({run['archive_backend']}), d={run['dim']}, {run['data']}"
        for ax, kind in ((near, "nearest"), (like, "like")):
            (line,) = ax.plot(n, [p[kind]["p50_ms"] for p in run["points"]], marker="o", label=label)
            ax.plot(n, [p[kind]["p95_ms"] for p in run["points"]], ls="--", color=line.get_color())
        store.plot(n, [p["insert_ms_per_embedding"] for p in run["points"]], marker="o", label=label)
        (line,) = found.plot(n, [p["recall_at_10"]["mean"] for p in run["points"]], marker="o",
                             label=label + (f", ef_search {DEFAULT_EF_SEARCH}" if "wider" in run["points"][0] else ""))
        for j, row in enumerate(run["points"][0].get("wider", [])):
            found.plot(n, [p["wider"][j]["recall_at_10"] for p in run["points"]], marker=".", ls=":",
                       color=line.get_color(), alpha=1 - 0.15 * j, label=f"  ef_search {row['ef_search']}")
    for ax, title, ylabel in ((near, "nearest(vector), limit 10: p50 (solid), p95 (dashed)", "ms"),
                              (like, "like(study UID), limit 10: p50 (solid), p95 (dashed)", "ms"),
                              (store, "store, one study (one embedding) per call", "ms per embedding"),
                              (found, "recall@10 against brute-force exact search", "mean recall@10")):
        ax.set(xscale="log", xlabel="stored embeddings", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for ax in (near, like):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    store.set_ylim(bottom=0)
    found.set_ylim(0, 1.02)
    for ax in (near, like, store, found):
        ax.set_xticks(report["sizes"], [f"{n:,}" for n in report["sizes"]])
        ax.xaxis.set_minor_formatter(NullFormatter())
    data = ", ".join(f"{d['kind']} (d={d['dim']}, effective dimension {d['effective_dimension']:g})"
                     for d in report["data"])
    fig.suptitle(f"Embedding archive search on {report['host']['name']} ({report['host']['cpu_count']} cores); "
                 f"vectors: {data}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def server_version(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar()
            vector = conn.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
    finally:
        engine.dispose()
    return f"PostgreSQL {version}" + (f", pgvector {vector}" if vector else ", no pgvector")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="stored embeddings, increasing")
    parser.add_argument("--data", default="demo", help="demo (default) or gaussian; see Data")
    parser.add_argument("--dims", default="160", help="comma-separated, gaussian data only; 160 is the demo's")
    parser.add_argument("--nih", type=Path, default=Path("../shared/data/nih-cxr14-sample"))
    parser.add_argument("--cache", type=Path, default=Path("build/foundation/embeddings.npz"),
                        help="the demo embeddings of --nih (shared with bench.foundation)")
    parser.add_argument("--queries", type=int, default=100, help="of each kind (nearest, like) per point")
    parser.add_argument("--seconds", type=float, default=5.0, help="stop a point's queries after this long")
    parser.add_argument("--backends", default="sqlite,postgresql,pgvector")
    parser.add_argument("--pg-admin", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    databases = {"sqlite": sqlite_db, "postgresql": lambda: postgres_db(args.pg_admin), "pgvector": pgvector_db}
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.search", *(argv if argv is not None else sys.argv[1:])]),
        "method": __doc__.split("\n\n", 2)[2].strip().replace("\n", " "),
        "host": host(),
        "versions": {p: importlib.metadata.version(p) for p in ("numpy", "sqlalchemy", "psycopg2-binary")
                     if _installed(p)},
        "data": [], "sizes": sizes, "k": K, "hnsw_ef_search": DEFAULT_EF_SEARCH, "runs": [], "skipped": {},
        "servers": {},
    }
    sets = [Data(args.data, int(d), args.nih, args.cache) for d in args.dims.split(",")]
    report["data"] = [data.describe(np.random.default_rng(args.seed)) for data in sets]
    for name in args.backends.split(","):
        for data in sets:
            with ExitStack() as stack:
                try:
                    url = stack.enter_context(databases[name]())
                except (RuntimeError, OSError, OperationalError) as exc:
                    report["skipped"][name] = str(exc)
                    print(f"{name} skipped: {exc}", file=sys.stderr)
                    break
                print(f"{name}, {data.kind} data, {data.dim} dimensions", file=sys.stderr, flush=True)
                report["runs"].append(measure(name, url, sizes, data, args.queries, args.seconds, args.seed))
                if url.startswith("postgresql"):
                    report["servers"][name] = server_version(url)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(report, args.out / "search.png")
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["host"]["load_average_1m_at_end"] = os.getloadavg()[0]
    (args.out / "search.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[{report['wall_seconds']} s] wrote {args.out / 'search.json'} and search.png", file=sys.stderr)
    return report


def _installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
