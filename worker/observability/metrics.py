"""Prometheus metrics of a Pleura process (``/metrics``); every name starts with ``pleura_``.

Counters and histograms live in the process-wide default registry and are updated where
things happen (intake, sweeper, jobs, pipeline, delivery, the dynamic batcher); the monitor
gauges whenever :mod:`worker.monitor` computes (``pleura monitor``, the console's page). The ledger
gauges (studies by state, jobs and deliveries waiting) are read from the database at scrape
time by :class:`LedgerCollector`; when the database does not answer, ``pleura_ledger_up`` is 0
and the rest of the page is still served.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from worker.ledger import Delivery, Job, Notification, Study
from worker.ledger.models import DeliveryState, JobState, NotificationState, StudyState

#: The stages of a study, each timed from the ledger's own timestamps.
STAGES = ("received_to_queued", "queued_to_processing", "processing_to_results", "results_to_delivered")
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

INSTANCES = Counter("pleura_instances_received", "C-STORE requests answered: accepted (new or changed), "
                    "duplicate (identical resend) or refused (failure status)", ["outcome", "transfer_syntax"])
RECEIVED_BYTES = Counter("pleura_received_bytes", "Encoded bytes of the instances answered Success")
ASSOCIATIONS_ACTIVE = Gauge("pleura_associations_active", "Inbound DICOM associations open now")
ASSOCIATIONS_REJECTED = Counter("pleura_associations_rejected", "Inbound associations refused, by reason",
                                ["reason"])
STUDIES_COMPLETED = Counter("pleura_studies_completed", "Study revisions queued, by the rule that found them "
                            "complete: association (released, settled), quiet (quiet period), max_wait", ["rule"])
STAGE_SECONDS = Histogram("pleura_stage_seconds", "Time a study spent in each stage: received_to_queued "
                          "(last instance to queued), queued_to_processing (to first claim), processing_to_results "
                          "(claim to results committed), results_to_delivered (per delivery)",
                          ["stage"], buckets=STAGE_BUCKETS)
BATCH_SIZE = Histogram("pleura_inference_batch_size", "Images per engine call (dynamic batching)",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
BATCH_SECONDS = Histogram("pleura_inference_batch_seconds", "Time of one engine call",
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
DELIVERY_ATTEMPTS = Counter("pleura_delivery_attempts", "C-STORE tries of results: delivered, retry "
                            "(will be tried again) or failed (the delivery ended FAILED)", ["outcome"])
DELIVERY_FAILURES = Counter("pleura_delivery_failures", "Deliveries that ended FAILED, by reason", ["reason"])
NOTIFICATION_ATTEMPTS = Counter("pleura_notification_attempts", "Tries of RIS notifications (HL7, FHIR): delivered, "
                                "retry (will be tried again) or failed (ended FAILED)", ["protocol", "outcome"])
NOTIFICATION_FAILURES = Counter("pleura_notification_failures", "Notifications that ended FAILED, by reason: "
                                "peer_refused (HL7 AR, an HTTP 4xx), horizon_passed", ["protocol", "reason"])
NOTIFICATION_SECONDS = Histogram("pleura_notification_seconds", "From a notification's release (its SR delivered) "
                                 "to the peer's acceptance", ["protocol"], buckets=STAGE_BUCKETS)
MONITOR_VALUE = Gauge("pleura_monitor_value", "Concordance with the final reports over the newest window "
                      "(worker.monitor): each figure (sensitivity, specificity, ppv, npv, auc) as its value, the low "
                      "and high bounds of its 95% interval, and the bundle's stated value; NaN where not computable",
                      ["bundle", "version", "finding", "figure", "bound"])
MONITOR_ALARM = Gauge("pleura_monitor_alarm", "1 when a figure's whole 95% interval over the newest window lies below "
                      "the value the bundle's model card states (sensitivity, specificity, auc), else 0",
                      ["bundle", "version", "finding", "figure"])

for _rule in ("association", "quiet", "max_wait"):
    STUDIES_COMPLETED.labels(_rule)
for _stage in STAGES:
    STAGE_SECONDS.labels(_stage)
for _outcome in ("delivered", "retry", "failed"):
    DELIVERY_ATTEMPTS.labels(_outcome)
for _reason in ("peer_refused", "horizon_passed"):
    DELIVERY_FAILURES.labels(_reason)
for _protocol in ("HL7", "FHIR"):
    NOTIFICATION_SECONDS.labels(_protocol)
    for _outcome in ("delivered", "retry", "failed"):
        NOTIFICATION_ATTEMPTS.labels(_protocol, _outcome)
    for _reason in ("peer_refused", "horizon_passed"):
        NOTIFICATION_FAILURES.labels(_protocol, _reason)


def observe_stage(stage: str, seconds: float) -> None:
    STAGE_SECONDS.labels(stage).observe(max(seconds, 0.0))


def observe_batch(size: int, seconds: float) -> None:
    """The dynamic batcher's ``on_batch`` observer."""
    BATCH_SIZE.observe(size)
    BATCH_SECONDS.observe(seconds)


class LedgerCollector(Collector):
    """Studies by state and the work waiting, counted in the ledger at each scrape.

    ``engine`` should carry short connect and statement timeouts (see
    :func:`worker.observability.readiness.probe_engine`): a scrape must not hang on the database.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("pleura_ledger_up", "1 when the ledger answered this scrape, else 0")
        try:
            with self.engine.connect() as conn:
                studies = dict(conn.execute(select(Study.state, func.count()).group_by(Study.state)).all())
                jobs = dict(conn.execute(select(Job.state, func.count())
                                         .where(Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                                         .group_by(Job.state)).all())
                deliveries = dict(conn.execute(
                    select(Delivery.state, func.count())
                    .where(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]))
                    .group_by(Delivery.state)).all())
                notifications = dict(conn.execute(
                    select(Notification.state, func.count())
                    .where(Notification.state.in_([NotificationState.WAITING, NotificationState.PENDING,
                                                   NotificationState.SENDING]))
                    .group_by(Notification.state)).all())
        except SQLAlchemyError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield _by_state("pleura_studies", "Studies in the ledger by state", studies,
                        (StudyState.RECEIVING, StudyState.QUEUED, StudyState.PROCESSING, StudyState.DONE,
                         StudyState.FAILED))
        yield _by_state("pleura_jobs", "Queue depth: jobs waiting for a worker (QUEUED) or being processed "
                        "(RUNNING)", jobs, (JobState.QUEUED, JobState.RUNNING))
        yield _by_state("pleura_deliveries", "Deliveries waiting (PENDING, retries included) or being sent "
                        "(SENDING)", deliveries, (DeliveryState.PENDING, DeliveryState.SENDING))
        yield _by_state("pleura_notifications", "RIS notifications waiting for their SR's delivery (WAITING), "
                        "to be sent (PENDING, retries included) or being sent (SENDING)", notifications,
                        (NotificationState.WAITING, NotificationState.PENDING, NotificationState.SENDING))


def _by_state(name: str, documentation: str, counts: dict[str, int], states: tuple[str, ...]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    for state in dict.fromkeys([*states, *counts]):
        family.add_metric([state], counts.get(state, 0))
    return family
