"""``pleura serve``, ``listen`` and ``worker``: the processes, wired from the roles.

One place says what each process runs: the listener (:mod:`worker.listen`), the sweepers
(:mod:`worker.assemble`, :mod:`worker.process.cache`, :mod:`worker.storage.retention`), the
final-report intake (:mod:`worker.reports`), the HTTP endpoints (:mod:`worker.cli.endpoints`) and
the Celery worker (:mod:`worker.cli.celery_app`); at a stop signal the HTTP endpoints stop first and the
listener last.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

import structlog

from worker.cli.common import command, require_schema
from worker.cli.endpoints import start_http
from worker.settings import Settings

if TYPE_CHECKING:
    from engines import Bundle

log = structlog.get_logger("pleura")

#: ``pleura worker --name`` when none is given (a restart on the same host still recovers at once).
DEFAULT_WORKER_NAME = "1"


def _runtime(settings: Settings):  # type: ignore[no-untyped-def]
    from worker import runtime
    from worker.cli import celery_app
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


def _open_spool(s: Settings):  # type: ignore[no-untyped-def]
    """The spool, rid of the writes a crash cut short (open it once per listener, before any fork).
    With ``PLEURA_STORAGE=database`` the bytes are durable once their chunk rows commit with the
    instance's row: the spool file is only their way there, and is not fsynced."""
    from dicom_node.spool import Spool

    spool = Spool(s.spool_dir, s.min_free_disk_mb * 1024 * 1024, durable=s.storage != "database")
    if spool.removed_temp_files:
        log.warning("removed writes cut short by a crash (never acknowledged)", files=len(spool.removed_temp_files))
    return spool


def _receiver(rt, sweeper):  # type: ignore[no-untyped-def]
    """What the listeners record through; each release of an association (or STOW-RS request answered)
    wakes ``sweeper`` (if any) once the settle time has passed."""
    from worker.listen.receiver import LedgerReceiver

    s = rt.settings
    settle = s.study_settle_seconds
    wake = (lambda: sweeper.wake_in(settle + 0.05)) if sweeper is not None and settle >= 0 else None
    return LedgerReceiver(rt.ledger, rt.publish if s.prepare_on_arrival else None, on_released=wake,
                          storage=rt.storage())


def _start_listener(rt, sweeper, listen_socket=None, spool=None):  # type: ignore[no-untyped-def]
    """The DICOM listener; on ``listen_socket`` (bound already) when several processes share the port,
    each allowed its share of ``max_associations``."""
    from dicom_node.scp import AssociationPolicy, StorageSCP
    from dicom_node.tls import server_context

    s = rt.settings
    share = math.ceil(s.max_associations / s.listen_processes) if listen_socket is not None else s.max_associations
    policy = AssociationPolicy(tuple(s.allowed_calling_aes), share, s.acse_timeout_seconds,
                               s.dimse_timeout_seconds, s.network_timeout_seconds)
    tls = None
    if s.tls_cert_file is not None or s.tls_key_file is not None:
        if s.tls_cert_file is None or s.tls_key_file is None:
            raise ValueError("DICOM TLS needs both tls_cert_file and tls_key_file")
        tls = server_context(s.tls_cert_file, s.tls_key_file, s.tls_ca_file, s.tls_require_peer_cert)
    scp = StorageSCP(s.ae_title, s.dicom_host, s.dicom_port, spool or _open_spool(s), _receiver(rt, sweeper),
                     policy=policy, tls=tls, listen_socket=listen_socket,
                     max_inflated_bytes=s.max_inflated_mb * 2**20)
    scp.start()
    return scp


def _start_dicomweb(rt, sweeper, spool, listen_socket=None):  # type: ignore[no-untyped-def]
    """STOW-RS into the listener's spool with PLEURA_DICOMWEB_PORT (on ``listen_socket`` when several
    processes share the port); None without."""
    if rt.settings.dicomweb_port is None:
        return None
    from worker.listen import dicomweb

    return dicomweb.start(rt.settings, spool, _receiver(rt, sweeper), listen_socket)


def _start_sweepers(rt, periodic: bool = True):  # type: ignore[no-untyped-def]
    """The study sweeper (first), an hourly one that removes orphaned prepared entries, and with
    ``PLEURA_RETENTION_HOURS`` the retention sweeper.

    Not ``periodic`` (a forked listener process): only the study sweeper, run when an association
    of this process is released."""
    from worker.assemble.sweeper import Sweeper, sweep
    from worker.process import cache
    from worker.storage import retention

    s = rt.settings
    settle = s.study_settle_seconds if s.study_settle_seconds >= 0 else None
    sweepers = [Sweeper(s.sweep_interval_seconds if periodic else None,
                        lambda: sweep(rt.ledger, s.study_quiet_seconds, s.republish_seconds, rt.publish,
                                      settle, s.study_max_wait_seconds))]
    if periodic:
        sweepers.append(Sweeper(3600, lambda: cache.prune(cache.root(s))))
    if periodic and s.retention_hours is not None:
        hours = s.retention_hours
        sweepers.append(Sweeper(retention.interval_seconds(hours),
                                lambda: retention.purge(rt.ledger, rt.storage(), hours)))
    for sweeper in sweepers:
        sweeper.start()
    return sweepers


def _stop(*parts: Any) -> None:
    """Stop what a process started, in the order given (HTTP first, the listener last); None is skipped."""
    for part in parts:
        if part is not None:
            part.stop()


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


def _check_outbound(settings: Settings, bundle: Bundle) -> None:
    """Exit with the reason when the RIS notification settings cannot work with this model, or a token
    file for results or notifications is missing."""
    from worker.notify.result import check_triage

    try:
        check_triage(settings.triage_findings, bundle)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    for name, token in (("NOTIFY_FHIR", settings.notify_fhir_token_file),
                        ("DESTINATION", settings.destination_token_file)):
        if token is not None and not token.is_file():
            sys.exit(f"error: PLEURA_{name}_TOKEN_FILE={token} is not a readable file")


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

    from worker.assemble.recovery import recover
    from worker.cli import celery_app
    from worker.leases import set_identity
    from worker.ledger.db import upgrade
    from worker.queue import QUEUES

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url)
    set_identity("serve")
    rt = _runtime(settings)
    rt.cpu().start()  # its processes come up while the model loads; until then calls run in-thread
    work = WorkController(app=celery_app.app, pool_cls="threads", concurrency=settings.worker_concurrency,
                          without_heartbeat=True, without_mingle=True, without_gossip=True,
                          queues=QUEUES, loglevel=settings.log_level)
    threading.Thread(target=work.start, name="pleura-celery", daemon=True).start()
    # the dead predecessor's broker held its queue: its deliveries go out while the model loads
    recover(rt.ledger, rt.publish, requeue_all=True)
    _check_outbound(settings, _model(rt))
    sweepers = _start_sweepers(rt)
    spool = _open_spool(settings)
    scp = _start_listener(rt, sweepers[0], spool=spool)
    stow = _start_dicomweb(rt, sweepers[0], spool)
    reports, hl7 = _start_reports(rt)
    http = start_http(settings, rt, "serve", reports)
    log.info("pleura serve ready", database=settings.effective_database_url.split("://")[0],
             broker=settings.effective_broker_url.split("://")[0],
             destinations=[str(d) for d in settings.destinations])
    _wait_for_signal()
    _stop(http, stow, hl7, *sweepers, scp)
    work.stop(in_sighandler=False)


def cmd_listen(settings: Settings, args: argparse.Namespace) -> None:
    """Listener and sweeper; work goes to the broker for ``pleura worker`` processes."""
    if settings.embedded_broker:
        sys.exit("error: `pleura listen` needs PLEURA_BROKER_URL (e.g. amqp://guest:guest@host:5672//); "
                 "use `pleura serve` for the all-in-one")
    from dicom_node.scp import bind
    from worker.listen import processes as listener_processes

    shared, shared_stow, spool, group = None, None, None, listener_processes.Group()
    if settings.listen_processes > 1:
        if settings.effective_database_url.startswith("sqlite"):
            sys.exit("error: PLEURA_LISTEN_PROCESSES > 1 needs PostgreSQL (PLEURA_DATABASE_URL): "
                     "SQLite takes one writer at a time")
        try:
            shared = bind(settings.dicom_host, settings.dicom_port)
        except OSError as exc:
            sys.exit(f"error: cannot listen on {settings.dicom_host}:{settings.dicom_port}: {exc}")
        if settings.dicomweb_port is not None:
            from worker.listen.dicomweb import bind as bind_stow

            shared_stow = bind_stow(settings)
        spool = _open_spool(settings)
        group = listener_processes.fork(settings.listen_processes - 1)  # before any thread or connection
    rt = _runtime(settings)
    require_schema(rt.ledger)
    sweepers = [] if args.no_sweeper else _start_sweepers(rt, periodic=not group.forked)
    spool = spool or _open_spool(settings)
    sweeper = sweepers[0] if sweepers else None
    scp = _start_listener(rt, sweeper, shared, spool)
    stow = _start_dicomweb(rt, sweeper, spool, shared_stow)
    reports, hl7 = (None, None) if group.forked else _start_reports(rt)
    http = None if group.forked else start_http(settings, rt, "listen", reports)
    status = listener_processes.wait(group)
    _stop(http, stow, hl7, *sweepers, scp)
    listener_processes.stop_children(group)
    if status:
        sys.exit(status)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> None:
    """A Celery worker that processes studies and delivers results."""
    if settings.embedded_broker:
        sys.exit("error: `pleura worker` needs PLEURA_BROKER_URL; use `pleura serve` for the all-in-one")
    from worker.assemble.recovery import recover
    from worker.cli import celery_app
    from worker.leases import set_identity
    from worker.queue import QUEUES

    name = args.name or DEFAULT_WORKER_NAME
    set_identity(f"worker-{name}", explicit=args.name is not None)
    rt = _runtime(settings)
    require_schema(rt.ledger)
    rt.cpu().start()
    _check_outbound(settings, _model(rt))
    recover(rt.ledger, rt.publish, requeue_all=False)  # the broker kept the queue; leases are ours to free
    start_http(settings, rt, "worker")
    celery_app.app.worker_main([
        "worker", "--pool=threads", f"--concurrency={settings.worker_concurrency}",
        f"--loglevel={settings.log_level}", "-Q", ",".join(QUEUES),
        "--without-gossip", "--without-mingle", f"--hostname=pleura@%h-{name}",
    ])


def cmd_db(settings: Settings, args: argparse.Namespace) -> None:
    from worker.ledger.db import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.effective_database_url, args.revision)
    print(f"database schema at {args.revision}")



def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve``, ``listen``, ``worker`` and ``db`` to the ``pleura`` subcommands."""
    command(sub, "serve", "run everything in one process (embedded SQLite and queue)", cmd_serve)
    p = command(sub, "listen", "receive studies over DICOM, queue them for workers", cmd_listen)
    p.add_argument("--no-sweeper", action="store_true", help="run the listener only")
    p = command(sub, "worker", "analyse queued studies and send the results back", cmd_worker)
    p.add_argument("--name", default=None,
                   help=f"this worker's name (default {DEFAULT_WORKER_NAME}): Celery's hostname suffix; restarted "
                        "under the same name, on any host, it takes back its predecessor's leases at once")
    p = command(sub, "db", "create or upgrade the database schema", cmd_db)
    p.add_argument("action", choices=["upgrade"])
    p.add_argument("revision", nargs="?", default="head", help="schema revision (default head, the latest)")
