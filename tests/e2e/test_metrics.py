"""Issue 7, Must show 1: `/metrics` of `pleura listen` and `pleura worker` count exactly the studies
sent, and `/readyz` turns unready when PostgreSQL stops and ready again when it returns.

Production mode on a private PostgreSQL cluster (stopped by the test) and a private RabbitMQ
node, delivering to a DCMTK storescp. Three studies of two small CR images each go over one
association; one association with a wrong called AE title is rejected. Both processes log
JSON (stderr is not a terminal) with correlation fields.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from sqlalchemy import create_engine, text

from tests.e2e.harness import pleura, pleura_run, running, storescp, wait_port
from tests.figures import save
from tests.reliability.ingest import SendLog, send, small_studies
from tests.reliability.services import PrivatePostgres, PrivateRabbitMQ, pleura_env
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration

STUDIES, IMAGES = 3, 2
SETTLE = 0.5  # the default PLEURA_STUDY_SETTLE_SECONDS
OUTPUTS = STUDIES * (IMAGES + 1)  # one SC per image and one SR per study, one destination


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = _get(port, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def _sample(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def _mean(metrics: dict, stage: str) -> float:
    total = _sample(metrics, "pleura_stage_seconds_sum", stage=stage)
    return round(total / _sample(metrics, "pleura_stage_seconds_count", stage=stage), 3)


def _ready(port: int) -> tuple[int, dict[str, Any]]:
    status, body = _get(port, "/readyz")
    return status, {c["name"]: c for c in json.loads(body)["checks"]}


def _json_lines(log: Path) -> list[dict[str, Any]]:
    lines = log.read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _services(request: pytest.FixtureRequest) -> tuple[PrivatePostgres, PrivateRabbitMQ]:
    """Both private services, started side by side; each closed when the test ends."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(PrivatePostgres), pool.submit(PrivateRabbitMQ)]
    for future in futures:
        if future.exception() is None:
            request.addfinalizer(future.result().close)
    pg, rmq = (future.result() for future in futures)  # raises (or skips) after both are cleaned up
    return pg, rmq


def test_metrics_count_the_studies_sent_and_readyz_follows_the_database(
    nih: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    studies = small_studies(nih, STUDIES, IMAGES)
    pg, rmq = _services(request)
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port, listen_http, worker_http = free_port(), free_port(), free_port()
    # every study completes at the association's release (the settle rule): a quiet period no loaded
    # host's pause between two C-STOREs reaches, so none completes by it
    env = pleura_env(tmp_path, pg.url, rmq.url, port, f"DEST@127.0.0.1:{dest_port}", study_quiet_seconds=600)
    # the batch histogram is checked against the jobs' batching: no image inferred on arrival, one per batch
    env["PLEURA_PREPARE_ON_ARRIVAL"] = "false"
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", {**env, "PLEURA_HTTP_PORT": str(listen_http)}, tmp_path / "listen.log")
    work = pleura("worker", {**env, "PLEURA_HTTP_PORT": str(worker_http)}, tmp_path / "worker.log")
    ledger = create_engine(pg.url, pool_pre_ping=True)
    request.addfinalizer(ledger.dispose)

    def scalar(sql: str) -> Any:
        with ledger.connect() as conn:
            return conn.execute(text(sql)).scalar()

    with running(listen, work, dest):
        wait_port(port, listen)
        wait_port(worker_http, work)  # the worker serves HTTP once its model is loaded and verified
        sent = SendLog()
        send(port, [ds for study in studies for ds in study], sent)
        assert sent.with_status(0) and len(sent.with_status(0)) == STUDIES * IMAGES, sent.errors
        rejected = AE(ae_title="MODALITY")
        rejected.add_requested_context("1.2.840.10008.1.1")
        assert not rejected.associate("127.0.0.1", port, ae_title="NOT_PLEURA").is_established

        wait_for(lambda: _sample(_metrics(worker_http), "pleura_delivery_attempts_total", outcome="delivered")
                 == OUTPUTS, 180, "every result delivered")
        wait_for(lambda: _sample(_metrics(listen_http), "pleura_associations_active") == 0, 60,
                 "the association's end")
        lm, wm = _metrics(listen_http), _metrics(worker_http)

        # the listener: what it received, refused and queued, and the ledger as it stands
        assert _sample(lm, "pleura_instances_received_total", outcome="accepted",
                       transfer_syntax="Explicit VR Little Endian") == STUDIES * IMAGES
        assert _sample(lm, "pleura_received_bytes_total") == scalar("SELECT sum(size_bytes) FROM instances") > 0
        assert _sample(lm, "pleura_associations_rejected_total", reason="called_ae") == 1
        assert _sample(lm, "pleura_stage_seconds_count", stage="received_to_queued") == STUDIES
        # every sender released its association: complete one settle time (0.5 s) after the last image
        assert _sample(lm, "pleura_studies_completed_total", rule="association") == STUDIES
        assert _sample(lm, "pleura_studies_completed_total", rule="quiet") == 0
        assert _sample(lm, "pleura_stage_seconds_bucket", stage="received_to_queued", le=str(SETTLE)) == 0
        assert _sample(lm, "pleura_stage_seconds_sum", stage="received_to_queued") >= STUDIES * SETTLE
        assert _sample(lm, "pleura_ledger_up") == 1
        assert _sample(lm, "pleura_studies", state="DONE") == STUDIES == scalar(
            "SELECT count(*) FROM studies WHERE state = 'DONE'")
        assert _sample(lm, "pleura_jobs", state="QUEUED") == _sample(lm, "pleura_jobs", state="RUNNING") == 0
        assert _sample(lm, "pleura_inference_batch_size_count") == 0  # the listener runs no model

        # the worker: each stage once per study, every image inferred once, every result delivered once
        for stage in ("queued_to_processing", "processing_to_results"):
            assert _sample(wm, "pleura_stage_seconds_count", stage=stage) == STUDIES, stage
        assert _sample(wm, "pleura_stage_seconds_count", stage="results_to_delivered") == OUTPUTS == scalar(
            "SELECT count(*) FROM deliveries WHERE state = 'DELIVERED'")
        assert _sample(wm, "pleura_inference_batch_size_sum") == STUDIES * IMAGES
        assert 1 <= _sample(wm, "pleura_inference_batch_size_count") <= STUDIES
        assert _sample(wm, "pleura_inference_batch_seconds_count") == _sample(wm, "pleura_inference_batch_size_count")
        assert _sample(wm, "pleura_delivery_attempts_total", outcome="retry") == 0
        assert _sample(wm, "pleura_delivery_attempts_total", outcome="failed") == 0
        assert _sample(wm, "pleura_studies", state="DONE") is None  # ledger gauges come from the listener only
        assert len(list((tmp_path / "received").iterdir())) == OUTPUTS

        # readiness follows the database
        for http, checks in ((listen_http, {"database", "broker", "spool"}),
                             (worker_http, {"database", "broker", "model"})):
            status, ready = _ready(http)
            assert status == 200 and set(ready) == checks and all(c["ok"] for c in ready.values()), ready
        pg.stop()
        stopped = time.monotonic()
        for http in (listen_http, worker_http):
            ready = wait_for(lambda h=http: (r := _ready(h))[0] == 503 and r[1], 60, "unready without the database")
            assert not ready["database"]["ok"] and ready["broker"]["ok"], ready
        unready_after = time.monotonic() - stopped
        assert _sample(_metrics(listen_http), "pleura_ledger_up") == 0  # the page is still served
        pg.start()
        started = time.monotonic()
        for http in (listen_http, worker_http):
            wait_for(lambda h=http: _ready(h)[0] == 200, 60, "ready again once the database is back")
        save("metrics-readiness", {
            "studies": STUDIES, "images": STUDIES * IMAGES, "deliveries": OUTPUTS,
            "unready_after_database_stop_s": round(unready_after, 2),
            "ready_after_database_start_s": round(time.monotonic() - started, 2),
            "mean_stage_seconds": {"received_to_queued": _mean(lm, "received_to_queued"), **{
                stage: _mean(wm, stage) for stage in ("queued_to_processing", "processing_to_results",
                                                      "results_to_delivered")}},
        })

    # JSON log lines with correlation fields
    done = [line for line in _json_lines(tmp_path / "worker.log") if line.get("event") == "job done"]
    assert len(done) == STUDIES and all({"task_id", "job_id", "study_id"} <= set(line) for line in done), done
    assert len({line["study_id"] for line in done}) == STUDIES
    ended = [line for line in _json_lines(tmp_path / "listen.log") if line.get("event") == "association ended"]
    assert len(ended) == 1 and ended[0]["association_id"] and ended[0]["study_id"]
