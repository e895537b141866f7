"""How often the concordance alarm fires on healthy windows, and whether it catches a planted drift.

    .venv/bin/python -m bench.monitor_alarms [--draws 40] [--out bench/results]

Each draw is the ledger of ``tests/worker/monitor/test_concordance.py`` (250 NIH studies scored by the demo
model, 4 weekly windows of 50 healthy studies, the newest window's scores shuffled across its
studies) built from another random choice of the 250 among the sample's 490, on an SQLite ledger,
against the card restated on the whole sample (``_card``). Counted: draws with an alarm in some
healthy window, and how many findings raise an AUC alarm in the shuffled one. Writes
``monitor_alarms.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

import engines
import tests.worker.monitor.test_concordance as scenario
from worker.ledger.db import Ledger
from worker.monitor import concordance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    rows = list(csv.DictReader((scenario.NIH / "labels.csv").open()))
    engine = engines.load("demo")
    thresholds = np.array([f.threshold for f in engine.bundle.reported_findings])
    card = scenario._card(engine, rows, thresholds)
    images = [np.asarray(Image.open(scenario.NIH / "images" / r["image"]).convert("L"), np.float32) / 255.0
              for r in rows]
    plain = engine.infer(images).probabilities.astype(float)
    mirrored = engine.infer([np.fliplr(i).copy() for i in images]).probabilities.astype(float)
    points = {(engine.bundle.name, engine.bundle.version):
              {f: {k: v[k] for k in concordance.STATED} for f, v in card.items()}}
    draws = []
    for seed in range(args.draws):
        chosen = np.random.default_rng(seed).permutation(len(rows))[:250]
        probabilities, owner = [], []
        for i, c in enumerate(chosen):  # a fifth of the studies with a second, mirrored image, as the test
            probabilities += [plain[c], mirrored[c]] if i % 5 == 0 else [plain[c]]
            owner += [i, i] if i % 5 == 0 else [i]
        scored = {"rows": [rows[c] for c in chosen], "owner": np.array(owner),
                  "probabilities": np.array(probabilities), "bundle": engine.bundle, "thresholds": thresholds,
                  "findings": [f.name for f in engine.bundle.reported_findings]}
        now = datetime.now(UTC)
        url = f"sqlite:///{tempfile.mkdtemp(prefix='pleura-monitor-')}/ledger.db"
        studies = scenario._studies(scored, now)
        scenario._populate(url, scored, studies)
        ledger = Ledger(url)
        with ledger.session() as s:
            records = concordance.compute(s, concordance.Options(scenario.DAYS, scenario.WINDOWS), points, now)
        ledger.close()
        healthy = [[r.finding, r.window, list(r.alarms)] for r in records if r.window > 0 and r.alarms]
        drift = sorted({r.finding for r in records if r.window == 0 and "auc" in r.alarms})
        draws.append({"seed": seed, "healthy_alarms": healthy, "drift_auc_alarms": drift})
        print(f"draw {seed}: healthy alarms {healthy or 'none'}; drift AUC alarms {drift}", flush=True)
    result = {"command": f"python -m bench.monitor_alarms --draws {args.draws}", "card": card,
              "draws_with_a_healthy_alarm": sum(bool(d["healthy_alarms"]) for d in draws),
              "draws_without_a_drift_auc_alarm": sum(not d["drift_auc_alarms"] for d in draws),
              "drift_auc_alarm_findings": dict(sorted(Counter(len(d["drift_auc_alarms"]) for d in draws).items())),
              "draws": draws}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "monitor_alarms.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['draws_with_a_healthy_alarm']} of {args.draws} draws alarmed in a healthy window; "
          f"{result['draws_without_a_drift_auc_alarm']} missed the drift")


if __name__ == "__main__":
    main()
