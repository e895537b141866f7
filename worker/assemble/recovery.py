"""Taking back, at start, the work that a dead predecessor of this process held.

A lease is certainly dead when its owner is a dead predecessor of this process
(:meth:`worker.leases.Identity.is_predecessor`). :func:`recover` takes those leases back and
publishes the work at once, instead of letting it wait out the lease. ``pleura serve`` also
re-publishes every queued job and due delivery and RIS notification: its broker lived in the dead
process. The claim rules stay as they are, so a message sent twice still does the work once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
from sqlalchemy import select, update

from worker.leases import identity
from worker.ledger import Delivery, Job, Notification
from worker.ledger.db import Ledger, utcnow
from worker.ledger.events import record
from worker.ledger.models import DeliveryState, JobState, NotificationState
from worker.queue import DELIVER_TASK, NOTIFY_TASK, PROCESS_TASK, Publish

log = structlog.get_logger(__name__)


@dataclass
class Recovered:
    jobs: list[int] = field(default_factory=list)
    deliveries: list[int] = field(default_factory=list)
    notifications: list[int] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)


def recover(ledger: Ledger, publish: Publish, requeue_all: bool) -> Recovered:
    """Release predecessors' leases (and, ``requeue_all``, take every queued job and due delivery)
    and publish that work now; a publish that fails is left to the sweeper."""
    me, now, found = identity(), utcnow(), Recovered()
    with ledger.session() as s:
        owners = set(s.scalars(select(Job.lease_owner).where(Job.state == JobState.RUNNING)).all())
        owners |= set(s.scalars(select(Delivery.lease_owner).where(Delivery.state == DeliveryState.SENDING)).all())
        owners |= set(s.scalars(select(Notification.lease_owner)
                                .where(Notification.state == NotificationState.SENDING)).all())
        found.owners = sorted(o for o in owners if o and me.is_predecessor(o))
        released_job = (Job.state == JobState.RUNNING) & Job.lease_owner.in_(found.owners)
        released_delivery = (Delivery.state == DeliveryState.SENDING) & Delivery.lease_owner.in_(found.owners)
        released_notification = ((Notification.state == NotificationState.SENDING)
                                 & Notification.lease_owner.in_(found.owners))
        if requeue_all:
            released_job |= Job.state == JobState.QUEUED
            released_delivery |= (Delivery.state == DeliveryState.PENDING) & (Delivery.next_attempt_at <= now)
            released_notification |= ((Notification.state == NotificationState.PENDING)
                                      & (Notification.next_attempt_at <= now))
        found.jobs = list(s.scalars(select(Job.id).where(released_job).with_for_update()).all())
        found.deliveries = list(s.scalars(select(Delivery.id).where(released_delivery).with_for_update()).all())
        # an expired lease is claimable (worker.process.jobs.claim, worker.deliver.send); a queued row is as it was
        s.execute(update(Job).where(Job.id.in_(found.jobs), Job.state == JobState.RUNNING)
                  .values(lease_expires_at=now))
        s.execute(update(Job).where(Job.id.in_(found.jobs)).values(published_at=now))
        s.execute(update(Delivery).where(Delivery.id.in_(found.deliveries), Delivery.state == DeliveryState.SENDING)
                  .values(lease_expires_at=now))
        s.execute(update(Delivery).where(Delivery.id.in_(found.deliveries)).values(published_at=now))
        found.notifications = list(s.scalars(select(Notification.id).where(released_notification)
                                             .with_for_update()).all())
        s.execute(update(Notification).where(Notification.id.in_(found.notifications),
                                             Notification.state == NotificationState.SENDING)
                  .values(lease_expires_at=now))
        s.execute(update(Notification).where(Notification.id.in_(found.notifications)).values(published_at=now))
        if found.jobs or found.deliveries or found.notifications:
            record(s, "work_recovered", by=str(me), from_owners=found.owners, jobs=found.jobs,
                   deliveries=found.deliveries, notifications=found.notifications)
    unsent_jobs = [i for i in found.jobs if not publish(PROCESS_TASK, i)]
    unsent_deliveries = [i for i in found.deliveries if not publish(DELIVER_TASK, i)]
    unsent_notifications = [i for i in found.notifications if not publish(NOTIFY_TASK, i)]
    if unsent_jobs or unsent_deliveries or unsent_notifications:
        with ledger.session() as s:
            s.execute(update(Job).where(Job.id.in_(unsent_jobs)).values(published_at=None))
            s.execute(update(Delivery).where(Delivery.id.in_(unsent_deliveries)).values(published_at=None))
            s.execute(update(Notification).where(Notification.id.in_(unsent_notifications))
                      .values(published_at=None))
    if found.jobs or found.deliveries or found.notifications:
        log.info("work recovered from predecessors", owners=len(found.owners), jobs=len(found.jobs),
                 deliveries=len(found.deliveries), notifications=len(found.notifications))
    return found
