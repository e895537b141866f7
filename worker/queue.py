"""The work queue's contract: Celery task names, the queues they travel on, and how roles publish.

A message names one ledger row id and nothing else; the ledger decides whether the work is due
(:mod:`worker.leases`), so a lost or duplicated message is harmless. The Celery app that consumes
these names is :mod:`worker.cli.celery_app`.
"""

from __future__ import annotations

from collections.abc import Callable

#: publish(task_name, id) sends one Celery message; False when it could not be sent.
Publish = Callable[[str, int], bool]

PROCESS_TASK = "pleura.process_job"
DELIVER_TASK = "pleura.deliver"
NOTIFY_TASK = "pleura.notify"
#: A hint, published by the listener for each accepted instance: decode and infer it now (worker.process.prepare).
PREPARE_TASK = "pleura.prepare"

QUEUE = "pleura"
#: Deliveries (and RIS notifications) have their own queue so that results never wait behind a
#: backlog of inference.
DELIVERY_QUEUE = "pleura-delivery"
#: Decode + inference of each image on arrival (hints): a backlog of them never sits in front of a job.
PREPARE_QUEUE = "pleura-prepare"
QUEUES = [QUEUE, DELIVERY_QUEUE, PREPARE_QUEUE]
_ROUTES = {DELIVER_TASK: DELIVERY_QUEUE, NOTIFY_TASK: DELIVERY_QUEUE, PREPARE_TASK: PREPARE_QUEUE}


def queue_of(task_name: str) -> str:
    """The queue a task's messages travel on."""
    return _ROUTES.get(task_name, QUEUE)
