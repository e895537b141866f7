"""The Celery app: transport only. The ledger decides what runs; tasks just name a row id (:mod:`worker.queue`)."""

from __future__ import annotations

import structlog
from celery import Celery, signals

from worker import runtime
from worker.deliver import send as deliver_send
from worker.logging import log_context
from worker.notify import send as notify_send
from worker.process import pipeline, prepare
from worker.queue import DELIVER_TASK, NOTIFY_TASK, PREPARE_TASK, PROCESS_TASK, QUEUE, queue_of
from worker.settings import Settings

log = structlog.get_logger(__name__)

app = Celery("pleura")
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # a worker waits out a broker restart, however long
    # the sweeper must not hang on a broker that is down: fail fast, the ledger re-publishes later
    task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
    # the embedded broker (memory://) is polled: 20 ms costs nothing in-process and adds at most 20 ms
    # per hop (job, then deliveries) where 0.2 s added up to 0.4 s to every result (RabbitMQ pushes)
    broker_transport_options={"polling_interval": 0.02},
)


@signals.setup_logging.connect
def _keep_pleura_logging(**_kwargs: object) -> None:
    """Celery leaves logging as :func:`worker.logging.configure` set it (its records in the same format)."""


@app.task(name=PROCESS_TASK, bind=True)
def process_job(self, job_id: int) -> None:  # type: ignore[no-untyped-def]
    with log_context(task_id=self.request.id):
        pipeline.run_job(runtime.current(), job_id)


@app.task(name=DELIVER_TASK, bind=True)
def deliver(self, delivery_id: int) -> None:  # type: ignore[no-untyped-def]
    with log_context(task_id=self.request.id):
        deliver_send.deliver(runtime.current(), delivery_id)


@app.task(name=NOTIFY_TASK, bind=True)
def notify(self, notification_id: int) -> None:  # type: ignore[no-untyped-def]
    with log_context(task_id=self.request.id):
        notify_send.notify(runtime.current(), notification_id)


# Acknowledged on receipt: a hint whose image kills the worker is not redelivered to kill the next one.
@app.task(name=PREPARE_TASK, bind=True, acks_late=False)
def prepare_instance(self, instance_id: int) -> None:  # type: ignore[no-untyped-def]
    with log_context(task_id=self.request.id):
        prepare.prepare(runtime.current(), instance_id)


def configure(settings: Settings) -> Celery:
    app.conf.broker_url = settings.effective_broker_url
    return app


def publish(task_name: str, row_id: int) -> bool:
    """Send one message; False on failure (logged): the sweeper re-publishes jobs and deliveries
    from the ledger, a lost prepare hint leaves the work to the job."""
    try:
        app.send_task(task_name, args=[row_id], queue=queue_of(task_name))
        return True
    except Exception as exc:
        log.warning("publish failed", task=task_name, id=row_id, error=str(exc))
        return False
