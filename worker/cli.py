"""The ``pleura`` command line: serve, listen, worker, db, send, status, search, models, synth, eval, heads,
audit (the last three registered by :mod:`worker.heads_cli` and :mod:`worker.audit_cli`)."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from worker import audit_cli, heads_cli
from worker.monitor import cli as monitor_cli
from worker.observability.endpoints import start_http
from worker.reports import cli as reports_cli
from worker.settings import Settings, load_settings

if TYPE_CHECKING:
    from engines import Bundle

log = structlog.get_logger("pleura")

#: ``pleura worker --name`` when none is given (a restart on the same host still recovers at once).
DEFAULT_WORKER_NAME = "1"
#: engines.backends.KINDS, named here so that parsing the command line imports no engine
BACKEND_KINDS = ("tensorrt", "onnxruntime", "torch")
DESCRIPTION = ("Pleura receives chest X-ray studies from a PACS over DICOM, analyses them with AI models and "
               "sends the results (a structured report and a heatmap image) back into each study; every step is "
               "recorded in its database for audit.")
EPILOG = ("`pleura COMMAND --help` describes a command and its options. Settings come from PLEURA_* environment "
          "variables and the --config file. Commands that print records take --json for a JSON document.")


def _runtime(settings: Settings):  # type: ignore[no-untyped-def]
    from worker import celery_app, runtime
    from worker.ledger.db import Ledger

    celery_app.configure(settings)
    rt = runtime.Runtime(settings=settings, ledger=Ledger(settings.effective_database_url),
                         publish=celery_app.publish)
    runtime.install(rt)
    try:
        rt.storage()
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    return rt


def _require_schema(rt) -> None:  # type: ignore[no-untyped-def]
    from worker.ledger.db import schema_is_current

    if not schema_is_current(rt.ledger.engine):
        sys.exit("error: the database schema is not current; run `pleura db upgrade` first")


def _open_spool(s: Settings):  # type: ignore[no-untyped-def]
    """The spool, rid of the writes a crash cut short (open it once per listener, before any fork)."""
    from dicom_node.spool import Spool

    spool = Spool(s.spool_dir, s.min_free_disk_mb * 1024 * 1024)
    if spool.removed_temp_files:
        log.warning("removed writes cut short by a crash (never acknowledged)", files=len(spool.removed_temp_files))
    return spool


def _start_listener(rt, sweeper, listen_socket=None, spool=None):  # type: ignore[no-untyped-def]
    """The DICOM listener; on ``listen_socket`` (bound already) when several processes share the port,
    each allowed its share of ``max_associations``. Each A-RELEASE wakes ``sweeper`` (if any) once
    the settle time has passed."""
    from dicom_node.scp import AssociationPolicy, StorageSCP
    from dicom_node.tls import server_context
    from worker.intake import LedgerReceiver

    s = rt.settings
    share = math.ceil(s.max_associations / s.listen_processes) if listen_socket is not None else s.max_associations
    policy = AssociationPolicy(tuple(s.allowed_calling_aes), share, s.acse_timeout_seconds,
                               s.dimse_timeout_seconds, s.network_timeout_seconds)
    tls = None
    if s.tls_cert_file is not None or s.tls_key_file is not None:
        if s.tls_cert_file is None or s.tls_key_file is None:
            raise ValueError("DICOM TLS needs both tls_cert_file and tls_key_file")
        tls = server_context(s.tls_cert_file, s.tls_key_file, s.tls_ca_file, s.tls_require_peer_cert)
    spool = spool or _open_spool(s)
    settle = s.study_settle_seconds
    wake = (lambda: sweeper.wake_in(settle + 0.05)) if sweeper is not None and settle >= 0 else None
    receiver = LedgerReceiver(rt.ledger, rt.publish if s.prepare_on_arrival else None, on_released=wake,
                              storage=rt.storage())
    scp = StorageSCP(s.ae_title, s.dicom_host, s.dicom_port, spool, receiver, policy=policy, tls=tls,
                     listen_socket=listen_socket, max_inflated_bytes=s.max_inflated_mb * 2**20)
    scp.start()
    return scp


def _start_sweepers(rt, periodic: bool = True):  # type: ignore[no-untyped-def]
    """The study sweeper (first), an hourly one that removes orphaned prepared entries, and with
    ``PLEURA_RETENTION_HOURS`` the retention sweeper.

    Not ``periodic`` (a forked listener process): only the study sweeper, run when an association
    of this process is released."""
    from worker import prepared
    from worker.storage import retention
    from worker.sweeper import Sweeper, sweep

    s = rt.settings
    settle = s.study_settle_seconds if s.study_settle_seconds >= 0 else None
    sweepers = [Sweeper(s.sweep_interval_seconds if periodic else None,
                        lambda: sweep(rt.ledger, s.study_quiet_seconds, s.republish_seconds, rt.publish,
                                      settle, s.study_max_wait_seconds))]
    if periodic:
        sweepers.append(Sweeper(3600, lambda: prepared.prune(prepared.root(s))))
    if periodic and s.retention_hours is not None:
        hours = s.retention_hours
        sweepers.append(Sweeper(retention.interval_seconds(hours),
                                lambda: retention.purge(rt.ledger, rt.storage(), hours)))
    for sweeper in sweepers:
        sweeper.start()
    return sweepers


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def _model(rt) -> Bundle:  # type: ignore[no-untyped-def]
    """The configured model, loaded through its pins, signature and parity gate; exit with the reason if refused."""
    from engines import BackendUnavailable, BundleError, ParityError

    try:
        engine = rt.engine()
    except (BundleError, ParityError, BackendUnavailable) as exc:
        sys.exit(f"error: model {rt.settings.model!r} refused, nothing will be analysed: {exc}")
    if not engine.bundle.pinned:
        log.warning("model bundle not pinned: nothing says its files are the ones validated",
                    bundle=engine.bundle.name, version=engine.bundle.version)
    return engine.bundle


def _check_notify(settings: Settings, bundle: Bundle) -> None:
    """Exit with the reason when the RIS notification settings cannot work with this model."""
    from worker.notify.result import check_triage

    try:
        check_triage(settings.triage_findings, bundle)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    token = settings.notify_fhir_token_file
    if token is not None and not token.is_file():
        sys.exit(f"error: PLEURA_NOTIFY_FHIR_TOKEN_FILE={token} is not a readable file")


def _start_reports(rt):  # type: ignore[no-untyped-def]
    """The intake of final reports from the RIS (worker.reports) and its MLLP listener (``PLEURA_HL7_PORT``);
    (None, None) when neither HL7 nor FHIR (``PLEURA_REPORTS_TOKEN_FILE``) reports are on."""
    from worker.reports import mllp, store

    s = rt.settings
    if s.reports_token_file is not None and not s.reports_token_file.is_file():
        sys.exit(f"error: PLEURA_REPORTS_TOKEN_FILE={s.reports_token_file} is not a readable file")
    if s.hl7_port is None and s.reports_token_file is None:
        return None, None
    try:
        intake = store.open_intake(s, rt.ledger)
        return intake, mllp.start(s, intake) if s.hl7_port is not None else None
    except (ValueError, OSError) as exc:
        sys.exit(f"error: cannot take final reports: {exc}")


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    """Everything in one process: SQLite, in-process Celery worker, listener, sweeper."""
    from celery.worker import WorkController

    from worker import celery_app
    from worker.ledger.db import upgrade
    from worker.recovery import recover, set_identity

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    set_identity("serve")
    rt = _runtime(settings)
    rt.cpu().start()  # its processes come up while the model loads; until then calls run in-thread
    work = WorkController(app=celery_app.app, pool_cls="threads", concurrency=settings.worker_concurrency,
                          without_heartbeat=True, without_mingle=True, without_gossip=True,
                          queues=celery_app.QUEUES, loglevel=settings.log_level)
    threading.Thread(target=work.start, name="pleura-celery", daemon=True).start()
    # the dead predecessor's broker held its queue: its deliveries go out while the model loads
    recover(rt.ledger, rt.publish, requeue_all=True)
    _check_notify(settings, _model(rt))
    sweepers = _start_sweepers(rt)
    scp = _start_listener(rt, sweepers[0])
    reports, hl7 = _start_reports(rt)
    http = start_http(settings, rt, "serve", reports)
    log.info("pleura serve ready", database=settings.effective_database_url.split("://")[0],
             broker=settings.effective_broker_url.split("://")[0],
             destinations=[str(d) for d in settings.destinations])
    _wait_for_signal()
    if http:
        http.stop()
    if hl7:
        hl7.stop()
    for sweeper in sweepers:
        sweeper.stop()
    scp.stop()
    work.stop(in_sighandler=False)


def cmd_listen(settings: Settings, args: argparse.Namespace) -> None:
    """Listener and sweeper; work goes to the broker for ``pleura worker`` processes."""
    if settings.embedded_broker:
        sys.exit("error: `pleura listen` needs PLEURA_BROKER_URL (e.g. amqp://guest:guest@host:5672//); "
                 "use `pleura serve` for the all-in-one")
    from dicom_node.scp import bind
    from worker import listener_processes

    shared, spool, group = None, None, listener_processes.Group()
    if settings.listen_processes > 1:
        if settings.effective_database_url.startswith("sqlite"):
            sys.exit("error: PLEURA_LISTEN_PROCESSES > 1 needs PostgreSQL (PLEURA_DATABASE_URL): "
                     "SQLite takes one writer at a time")
        try:
            shared = bind(settings.dicom_host, settings.dicom_port)
        except OSError as exc:
            sys.exit(f"error: cannot listen on {settings.dicom_host}:{settings.dicom_port}: {exc}")
        spool = _open_spool(settings)
        group = listener_processes.fork(settings.listen_processes - 1)  # before any thread or connection
    rt = _runtime(settings)
    _require_schema(rt)
    sweepers = [] if args.no_sweeper else _start_sweepers(rt, periodic=not group.forked)
    scp = _start_listener(rt, sweepers[0] if sweepers else None, shared, spool)
    reports, hl7 = (None, None) if group.forked else _start_reports(rt)
    http = None if group.forked else start_http(settings, rt, "listen", reports)
    status = listener_processes.wait(group)
    if http:
        http.stop()
    if hl7:
        hl7.stop()
    for sweeper in sweepers:
        sweeper.stop()
    scp.stop()
    listener_processes.stop_children(group)
    if status:
        sys.exit(status)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> None:
    """A Celery worker that processes studies and delivers results."""
    if settings.embedded_broker:
        sys.exit("error: `pleura worker` needs PLEURA_BROKER_URL; use `pleura serve` for the all-in-one")
    from worker import celery_app
    from worker.recovery import recover, set_identity

    name = args.name or DEFAULT_WORKER_NAME
    set_identity(f"worker-{name}", explicit=args.name is not None)
    rt = _runtime(settings)
    _require_schema(rt)
    rt.cpu().start()
    _check_notify(settings, _model(rt))
    recover(rt.ledger, rt.publish, requeue_all=False)  # the broker kept the queue; leases are ours to free
    start_http(settings, rt, "worker")
    celery_app.app.worker_main([
        "worker", "--pool=threads", f"--concurrency={settings.worker_concurrency}",
        f"--loglevel={settings.log_level}", "-Q", ",".join(celery_app.QUEUES),
        "--without-gossip", "--without-mingle", f"--hostname=pleura@%h-{name}",
    ])


def cmd_db(settings: Settings, args: argparse.Namespace) -> None:
    from worker.ledger.db import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url, args.revision)
    print(f"database schema at {args.revision}")


def cmd_send(settings: Settings, args: argparse.Namespace) -> None:
    """C-STORE ``args.paths``; one line (or ``--json`` record) per file; exit 1 if any was not stored."""
    from dicom_node.scu import AssociationRejected, collect_files, send_files

    try:
        files = collect_files(args.paths)
        results = send_files(args.host, args.port, files, called_ae=args.called_ae, calling_ae=args.calling_ae)
    except (FileNotFoundError, AssociationRejected, ValueError) as exc:
        sys.exit(f"error: {exc}")
    failed = sum(not r.ok for r in results)
    if args.json:
        print(json.dumps({"sent": len(results) - failed, "failed": failed, "results": [
            {"file": r.name, "sop_instance_uid": r.sop_instance_uid, "status": _dimse_status(r.status), "ok": r.ok,
             "error": r.error} for r in results]}, indent=2))
    else:
        for r in results:
            print(f"{_dimse_status(r.status) or 'not sent'}  {r.name}" + (f"  ({r.error})" if r.error else ""))
        print(f"{len(results) - failed} sent, {failed} failed")
    sys.exit(1 if failed else 0)


def _dimse_status(status: int | None) -> str | None:
    """``0x0000``-style, None when never sent."""
    return f"0x{status:04X}" if status is not None else None


def cmd_status(settings: Settings, args: argparse.Namespace) -> None:
    from worker.ledger.db import Ledger
    from worker.status import format_table, recent_studies

    rows = recent_studies(Ledger(settings.effective_database_url), args.limit)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))


def cmd_search(settings: Settings, args: argparse.Namespace) -> None:
    """Nearest studies to a study or image (``--like``), or to a text (bundles with a text side)."""
    from engines import BundleError
    from worker.embeddings import EmbeddingArchive, SearchError
    from worker.ledger.db import Ledger, schema_is_current
    from worker.models import bundle

    ledger = Ledger(settings.effective_database_url)
    if not schema_is_current(ledger.engine):
        sys.exit("error: the database schema is not current; run `pleura db upgrade` first")
    archive = EmbeddingArchive(ledger, settings.search_ef_search)
    try:
        if args.like:
            result = archive.like(args.like, args.limit, args.offset, args.bundle)
        else:
            result = archive.text(bundle(settings, args.bundle or settings.model), args.text, args.limit, args.offset)
    except (SearchError, BundleError) as exc:
        sys.exit(f"error: {exc}")
    finally:
        ledger.close()
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    print(f"backend {archive.describe()}")
    print(f"query {result.query} ({result.query_images} image(s)), bundle {result.bundle_name} "
          f"{result.bundle_version}, results {result.offset + 1}-{result.offset + len(result.hits)}")
    print(f"{'rank':>4}  {'score':>6}  {'study instance uid':<64}  sop instance uid")
    for hit in result.hits:
        print(f"{hit.rank:>4}  {hit.score:>6.3f}  {hit.study_instance_uid:<64}  {hit.sop_instance_uid}")
    if not result.hits:
        print("(no studies)")


def cmd_synth(settings: Settings, args: argparse.Namespace) -> None:
    from dicom_node.synthetic import TRANSFER_SYNTAXES, write_dataset_folder
    from worker.progress import Progress

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


def cmd_models(settings: Settings, args: argparse.Namespace) -> None:
    """list / verify / pin / sign / build / import model bundles."""
    from engines import BackendUnavailable, BundleError, ParityError
    from worker import models

    try:
        if args.action == "list":
            rows = models.listing(settings)
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in [] if args.json else rows:
                detail = row.get("error") or f"{row['version']}  {', '.join(row['findings']) or 'no findings'}"
                print(f"{row['name']:<20} {row['origin']:<9} {detail}")
        elif args.action == "verify":
            report = models.verify(settings, args.name, args.backend)
            print(json.dumps(report, indent=2) if args.json else "\n".join(models.describe(report)))
            if not report["passed"]:
                failed = [c["kind"] for c in report["backends"] if c["status"] == "failed"]
                parts = [k for k in ("pins", "signature") if report[k]["status"] == "failed"] + failed
                sys.exit(f"error: bundle verify FAILED ({', '.join(parts) or 'no backend could run here'}); "
                         "it must not serve patients until this passes")
        elif args.action == "pin":
            path, count = models.pin(settings, args.name)
            print(f"pinned {count} files of {path}; sign it again if it is to be trusted")
        elif args.action == "sign":
            path, signer = models.sign(settings, args.name, args.key)
            print(f"signed {path} with key {signer}")
        elif args.action == "build":
            from engines.build import build

            report = build(models.bundle(settings, args.name), backend=args.backend,
                           progress=lambda message: print(message, file=sys.stderr))
            print(report.describe())
        elif args.action == "import":
            from engines.importers import import_model

            out = args.out or settings.effective_models_dir / args.name
            options = {key: _option_value(value) for key, value in (o.split("=", 1) for o in args.option)}
            path = import_model(args.kind, args.source, out, name=args.name, version=args.version,
                                progress=lambda message: print(message, file=sys.stderr), **options)
            print(f"imported {args.kind} model as bundle {args.name} {args.version} at {path}")
    except (ParityError, BundleError, BackendUnavailable, FileNotFoundError, ValueError) as exc:
        sys.exit(f"error: {exc}")


def _option_value(text: str) -> str | bool:
    """``true``/``false`` become booleans (``allow_pickle=false`` must not read as truthy)."""
    return {"true": True, "false": False}.get(text.lower(), text)


def _command(sub: argparse._SubParsersAction, name: str, text: str,
             func: Callable[[Settings, argparse.Namespace], None]) -> argparse.ArgumentParser:
    """Subcommand ``name`` running ``func``, described by ``text`` in ``pleura --help`` and its own --help."""
    p = sub.add_parser(name, help=text, description=text)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pleura", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--config", type=Path, help="TOML file with settings (env PLEURA_* wins)")
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    _command(sub, "serve", "run everything in one process (embedded SQLite and queue)", cmd_serve)
    p = _command(sub, "listen", "receive studies over DICOM, queue them for workers", cmd_listen)
    p.add_argument("--no-sweeper", action="store_true", help="run the listener only")
    p = _command(sub, "worker", "analyse queued studies and send the results back", cmd_worker)
    p.add_argument("--name", default=None,
                   help=f"this worker's name (default {DEFAULT_WORKER_NAME}): Celery's hostname suffix; restarted "
                        "under the same name, on any host, it takes back its predecessor's leases at once")
    p = _command(sub, "db", "create or upgrade the database schema", cmd_db)
    p.add_argument("action", choices=["upgrade"])
    p.add_argument("revision", nargs="?", default="head", help="schema revision (default head, the latest)")
    p = _command(sub, "send", "send DICOM files or folders to a DICOM node (C-STORE)", cmd_send)
    p.add_argument("host", help="the receiving node's host name or address")
    p.add_argument("port", type=int, help="its DICOM port")
    p.add_argument("paths", nargs="+", help="DICOM files, or folders searched recursively")
    p.add_argument("--calling-ae", default="PLEURA_SCU", help="our AE title (default PLEURA_SCU)")
    p.add_argument("--called-ae", default="PLEURA", help="the receiver's AE title (default PLEURA)")
    p.add_argument("--json", action="store_true", help="print the results as a JSON document")
    p = _command(sub, "status", "list recent studies: state, timings, findings, deliveries", cmd_status)
    p.add_argument("--json", action="store_true", help="print the studies as a JSON list")
    p.add_argument("--limit", type=int, default=20, help="newest N studies (default 20)")
    p = _command(sub, "search", "find studies like a given study or image, or a text", cmd_search)
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--like", metavar="UID", help="a Study or SOP Instance UID already processed")
    query.add_argument("--text", help="a description (bundles with a text encoder only)")
    p.add_argument("--limit", type=int, default=10, help="results per page (default 10)")
    p.add_argument("--offset", type=int, default=0, help="results to skip (default 0)")
    p.add_argument("--bundle", help="bundle name (default: the query's latest; for --text the configured model)")
    p.add_argument("--json", action="store_true", help="print the result as a JSON document")
    p = sub.add_parser("models", help="model bundles: list, verify, pin, sign, build, import")
    models = p.add_subparsers(dest="action", required=True)
    m = models.add_parser("list", help="built-in and installed bundles")
    m.add_argument("--json", action="store_true")
    m = models.add_parser("verify", help="check the pins, the signature and the parity gate on every backend here")
    m.add_argument("name", help="bundle name or path")
    m.add_argument("--backend", default="all", choices=["all", *BACKEND_KINDS], help="check this backend only")
    m.add_argument("--json", action="store_true")
    m = models.add_parser("pin", help="record the SHA-256 of every file of an installed bundle in its manifest")
    m.add_argument("name", help="bundle name or path")
    m = models.add_parser("sign", help="sign a pinned bundle's manifest with an Ed25519 private key")
    m.add_argument("name", help="bundle name or path")
    m.add_argument("--key", type=Path, required=True, help="PEM private key (openssl genpkey -algorithm ed25519)")
    m = models.add_parser("build", help="prebuild/cache the engine (TensorRT plan) and warm it up")
    m.add_argument("name", help="bundle name or path")
    m.add_argument("--backend", default="auto", help="auto, tensorrt, onnxruntime or torch")
    m = models.add_parser("import", help="make a bundle from an operator-downloaded checkpoint")
    m.add_argument("kind", help="torchxrayvision, dinov2 or open_clip")
    m.add_argument("source", type=Path, help="checkpoint file or folder")
    m.add_argument("--name", required=True)
    m.add_argument("--version", required=True)
    m.add_argument("--out", type=Path, help="bundle directory (default: PLEURA_MODELS_DIR/NAME)")
    m.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="importer-specific option, e.g. prompts=prompts.json")
    p.set_defaults(func=cmd_models)
    p = _command(sub, "synth", "make test DICOM files from NIH ChestX-ray14 PNG images", cmd_synth)
    p.add_argument("--images", type=Path, required=True, help="folder of the NIH PNGs")
    p.add_argument("--labels", type=Path, required=True, help="the NIH labels CSV")
    p.add_argument("--out", type=Path, required=True, help="folder for the DICOM files")
    p.add_argument("--limit", type=int, help="at most N images")
    p.add_argument("--modality", choices=["CR", "DX"], default="CR")
    p.add_argument("--transfer-syntax", default="explicit", choices=["explicit", "j2k", "rle", "jpegls"])
    p.add_argument("--same-study", action="store_true", help="all images in one study of one patient")
    heads_cli.register(sub)
    audit_cli.register(sub)
    reports_cli.register(sub)
    monitor_cli.register(sub)
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


if __name__ == "__main__":
    main()
