"""How a model does against the final reports, over rolling windows, compared with its model card.

Per bundle version and finding, each window of ``window_days`` days (the newest ends now; a study
falls in the window of its analysis time, ``jobs.finished_at`` of its newest SUCCEEDED job of that
bundle version, windows being ``(start, end]``) pairs every analysed study with its current report:

- score: the highest probability of the finding over the study's images in that job; call: any
  image's ``positive``;
- label: the current report's (:func:`worker.reports.labels.current_labels`: the newest matched,
  not superseded, final or corrected; a preliminary one does not count): ``present`` is positive,
  ``absent`` and not mentioned (null) negative, ``uncertain`` left out (``excluded``) unless
  ``uncertain`` counts it as positive or negative. A study without such a report, or whose report
  has no entry for the finding (its labeler was not asked), is ``unlabelled``.

A figure alarms when its whole interval lies below the value the bundle states in
``manifest["evaluation"]["findings"][NAME]`` (sensitivity, specificity, auc): ``high < stated``.
The reported intervals are 95%; the one an alarm is judged on is widened for the number of figures
compared in that window (Bonferroni over every stated figure of every finding of the bundle version:
with 4 findings x 3 figures, 99.8%), so that a model doing as its card states raises a false alarm
in a window with probability at most about 2.5%, not once per figure. Without a stated value that
figure cannot alarm. Each alarm is recorded once as a ``monitor_alarm``
event (and logged): a later computation adds none while an event of the same bundle version,
finding and figure covers an overlapping window.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import structlog
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from engines.bundle import BUILTIN_DIR, MANIFEST
from worker.ledger import Event, Finding, Job
from worker.ledger.db import Ledger, as_utc, utcnow
from worker.ledger.events import record
from worker.ledger.models import JobState
from worker.monitor.stats import Estimate, bonferroni_z, figures
from worker.observability.metrics import MONITOR_ALARM, MONITOR_VALUE
from worker.reports.labels import Uncertain, current_labels, finding_label, truth
from worker.settings import Settings

log = structlog.get_logger(__name__)

FIGURES = ("sensitivity", "specificity", "ppv", "npv", "auc")
#: the figures a model card states, and that can alarm
STATED = ("sensitivity", "specificity", "auc")
ALARM_EVENT = "monitor_alarm"

#: (bundle name, version) -> finding -> stated figure -> value
OperatingPoints = dict[tuple[str, str], dict[str, dict[str, float]]]


@dataclass(frozen=True)
class Options:
    window_days: float
    windows: int = 6
    uncertain: Uncertain = "exclude"
    bundle: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class Record:
    """One bundle version's finding over one window; ``window`` 0 is the newest (ending now)."""

    bundle: str
    version: str
    finding: str
    window: int
    start: datetime
    end: datetime
    positives: int
    negatives: int
    excluded: int
    unlabelled: int
    figures: dict[str, Estimate | None]
    #: the model card's values; empty when the bundle states none for this finding (no alarm)
    stated: dict[str, float]
    alarms: tuple[str, ...]

    @property
    def n(self) -> int:
        return self.positives + self.negatives

    def as_dict(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "version": self.version, "finding": self.finding, "window": self.window,
                "start": self.start.isoformat(), "end": self.end.isoformat(), "n": self.n,
                "positives": self.positives, "negatives": self.negatives, "excluded": self.excluded,
                "unlabelled": self.unlabelled,
                **{name: e.as_dict() if e else None for name, e in self.figures.items()},
                "stated": self.stated or None, "alarms": list(self.alarms)}


def operating_points(settings: Settings) -> OperatingPoints:
    """The stated figures of the built-in and installed bundles (``evaluation.findings`` of each
    manifest; an installed copy's over a built-in one of the same name and version, as
    :func:`worker.bundles.catalogue.resolve` prefers it); a bundle that states none is absent."""
    points: OperatingPoints = {}
    for root in (BUILTIN_DIR, settings.effective_models_dir):
        for path in sorted(root.glob(f"*/{MANIFEST}")):
            try:
                manifest = json.loads(path.read_text())
                key, stated = (str(manifest["name"]), str(manifest["version"])), manifest["evaluation"]["findings"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            points[key] = {name: {f: float(v[f]) for f in STATED if isinstance(v.get(f), int | float)}
                           for name, v in stated.items() if isinstance(v, dict)}
    return points


def compute(s: Session, options: Options, points: OperatingPoints, now: datetime | None = None) -> list[Record]:
    """Every window of every bundle version and finding with results in them, oldest window first."""
    now = now or utcnow()
    span = timedelta(days=options.window_days)
    where = [Job.state == JobState.SUCCEEDED, Job.bundle_name.is_not(None), Job.bundle_version.is_not(None),
             Job.finished_at > now - span * options.windows, Job.finished_at <= now]
    if options.bundle:
        where.append(Job.bundle_name == options.bundle)
    if options.version:
        where.append(Job.bundle_version == options.version)
    newest: dict[tuple[int, str, str], tuple[datetime, int, int]] = {}
    for job_id, study_id, name, version, finished, revision in s.execute(
            select(Job.id, Job.study_id, Job.bundle_name, Job.bundle_version, Job.finished_at, Job.revision)
            .where(*where)):
        key, candidate = (study_id, name, version), (as_utc(finished), revision, job_id)
        newest[key] = max(newest.get(key, candidate), candidate)
    jobs = {job_id: (study_id, name, version, finished)
            for (study_id, name, version), (finished, _, job_id) in newest.items()}
    scores = s.execute(
        select(Finding.job_id, Finding.finding, func.max(Finding.probability),
               func.max(case((Finding.positive, 1), else_=0)))
        .join(Job, Job.id == Finding.job_id).where(*where).group_by(Finding.job_id, Finding.finding)).all()
    labels = current_labels(s)

    pairs: dict[tuple[str, str, str, int], list[tuple[bool, float, bool]]] = defaultdict(list)
    left_out: dict[tuple[str, str, str, int], list[int]] = defaultdict(lambda: [0, 0])  # excluded, unlabelled
    for job_id, finding, probability, positive in scores:
        if job_id not in jobs:
            continue
        study_id, name, version, finished = jobs[job_id]
        key = (name, version, finding, int((now - finished) / span))
        report = labels.get(study_id)
        if report is None or not (finding in report or finding.removesuffix(" (head)") in report):
            left_out[key][1] += 1
            continue
        label = truth(finding_label(report, finding), options.uncertain)
        if label is None:
            left_out[key][0] += 1
        else:
            pairs[key].append((label, float(probability), bool(positive)))

    records = []
    for name, version, finding in sorted({k[:3] for k in [*pairs, *left_out]}):
        stated = points.get((name, version), {}).get(finding, {})
        z = bonferroni_z(sum(len(v) for v in points.get((name, version), {}).values()))
        for window in reversed(range(options.windows)):
            key = (name, version, finding, window)
            table = np.array(pairs.get(key, []), float).reshape(-1, 3)  # label, score, call
            got = figures(table[:, 0] > 0, table[:, 1], table[:, 2] > 0)
            judged = figures(table[:, 0] > 0, table[:, 1], table[:, 2] > 0, z) if stated else {}
            alarms = tuple(f for f in STATED if f in stated and (e := judged[f]) is not None and e.high is not None
                           and e.high < stated[f])
            end = now - span * window
            excluded, unlabelled = left_out.get(key, (0, 0))
            positives = int(table[:, 0].sum())
            records.append(Record(name, version, finding, window, end - span, end, positives,
                                  len(table) - positives, excluded, unlabelled, got, stated, alarms))
    return records


def record_alarms(s: Session, records: Iterable[Record]) -> int:
    """A ``monitor_alarm`` event (and a log line) per alarm not recorded yet; how many were added."""
    seen: dict[tuple[str, ...], list[tuple[datetime, datetime]]] = defaultdict(list)
    for (detail,) in s.execute(select(Event.detail).where(Event.kind == ALARM_EVENT)):
        d = json.loads(detail or "{}")
        try:
            seen[d["bundle"], d["version"], d["finding"], d["figure"]].append(
                (datetime.fromisoformat(d["window_start"]), datetime.fromisoformat(d["window_end"])))
        except (KeyError, TypeError, ValueError):
            continue
    added = 0
    for r in records:
        for figure in r.alarms:
            key = (r.bundle, r.version, r.finding, figure)
            if any(start < r.end and r.start < end for start, end in seen[key]):
                continue
            seen[key].append((r.start, r.end))
            estimate = r.figures[figure]
            assert estimate is not None
            detail = {"bundle": r.bundle, "version": r.version, "finding": r.finding, "figure": figure,
                      "window_start": r.start.isoformat(), "window_end": r.end.isoformat(),
                      "value": estimate.value, "low": estimate.low, "high": estimate.high,
                      "stated": r.stated[figure], "positives": r.positives, "negatives": r.negatives}
            record(s, ALARM_EVENT, **detail)
            log.warning("model below its stated operating point", **detail)
            added += 1
    return added


def publish(records: Iterable[Record]) -> None:
    """Set the monitor gauges from the newest window's records (replacing every earlier series)."""
    MONITOR_VALUE.clear()
    MONITOR_ALARM.clear()
    for r in records:
        if r.window != 0:
            continue
        for figure in FIGURES:
            e = r.figures[figure] or Estimate(math.nan, None, None)
            bounds = {"value": e.value, "low": e.low, "high": e.high}
            if figure in r.stated:
                bounds["stated"] = r.stated[figure]
                MONITOR_ALARM.labels(r.bundle, r.version, r.finding, figure).set(figure in r.alarms)
            for bound, value in bounds.items():
                MONITOR_VALUE.labels(r.bundle, r.version, r.finding, figure, bound).set(
                    math.nan if value is None else value)


def run(ledger: Ledger, settings: Settings, options: Options, now: datetime | None = None) -> list[Record]:
    """Compute, record the new alarms and update the gauges."""
    with ledger.session() as s:
        records = compute(s, options, operating_points(settings), now)
        record_alarms(s, records)
    publish(records)
    return records
