"""Train a head from the ledger's embeddings, install it as a new bundle version, restart the
worker on it, and find the head's finding and the new version in the next study's SR (PostgreSQL)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from tests.e2e.harness import embedded_env, pleura, pleura_run, storescp, wait_for, wait_port
from tests.support import free_port

QUIET = 2
PER_CLASS = 10  # training studies with and without an effusion


def _content(items) -> list:  # type: ignore[no-untyped-def]
    """Every content item of an SR tree, depth first."""
    found = []
    for item in items:
        found.append(item)
        found += _content(getattr(item, "ContentSequence", []))
    return found


def _count(db, sql: str) -> int:  # type: ignore[no-untyped-def]
    with db.connect() as conn:
        return conn.execute(text(sql)).scalar()


@pytest.mark.integration
def test_trained_head_becomes_a_bundle_version_the_worker_serves(nih: Path, pg_url: str, tmp_path: Path) -> None:
    with open(nih / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    positive = [r for r in rows if "Effusion" in r["findings"].split("|")]
    negative = [r for r in rows if "Effusion" not in r["findings"].split("|")]
    chosen = positive[:PER_CLASS + 1] + negative[:PER_CLASS]  # the extra positive is the study served later
    subset = tmp_path / "subset.csv"
    with open(subset, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(chosen)
    inputs, later = tmp_path / "inputs", tmp_path / "later"
    pleura_run({}, "synth", "--images", str(nih / "images"), "--labels", str(subset), "--out", str(inputs))
    later.mkdir()
    held = inputs / chosen[PER_CLASS]["image"].replace(".png", ".dcm")
    held.rename(later / held.name)
    labels = tmp_path / "labels.csv"
    by_image = {r["image"]: r for r in chosen}
    with open(labels, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["StudyInstanceUID", "Effusion"])
        for path in sorted(inputs.glob("*.dcm")):
            effusion = "Effusion" in by_image[path.stem + ".png"]["findings"].split("|")
            writer.writerow([dcmread(path, stop_before_pixels=True).StudyInstanceUID, int(effusion)])

    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = {**embedded_env(tmp_path, port, dest_port, QUIET), "PLEURA_DATABASE_URL": pg_url}
    db = create_engine(pg_url)
    serve = pleura("serve", env, tmp_path / "serve.log")
    try:
        wait_port(port, serve, timeout=120)
        pleura_run({}, "send", "127.0.0.1", str(port), str(inputs))
        wait_for(lambda: _count(db, "SELECT count(*) FROM studies WHERE state = 'DONE'") == 2 * PER_CLASS, 120,
                 "training studies processed")
        trained = pleura_run(env, "heads", "train", "--from-ledger", "--labels", str(labels), "--finding",
                             "Effusion", "--folds", "3", "--out", str(tmp_path / "head"), "--write-bundle")
        model = re.search(r"PLEURA_MODEL=(\S+)", trained).group(1)  # type: ignore[union-attr]
        listed = json.loads(pleura_run(env, "models", "list", "--json"))
        version = next(b["version"] for b in listed if b["path"].endswith("/" + model))
        assert version == "0.1.0+head.Effusion.1"
        row = next(b for b in listed if b["version"] == version)
        assert row["findings"] == ["Cardiomegaly", "Effusion", "Atelectasis", "Abnormal", "Effusion (head)"]
        assert row["heads"] == ["Effusion (head)"] and row["origin"] == "installed"

        serve.stop()  # the reload: restart on the new bundle
        serve = pleura("serve", {**env, "PLEURA_MODEL": model}, tmp_path / "serve2.log")
        wait_port(port, serve, timeout=120)
        study_uid = dcmread(later / held.name, stop_before_pixels=True).StudyInstanceUID
        pleura_run({}, "send", "127.0.0.1", str(port), str(later))
        wait_for(lambda: _count(db, f"SELECT count(*) FROM studies WHERE state = 'DONE' "
                                    f"AND study_instance_uid = '{study_uid}'") == 1, 60, "new study processed")

        def sr() -> Path | None:
            for p in (tmp_path / "received").glob("*"):
                ds = dcmread(p, stop_before_pixels=True)
                if ds.Modality == "SR" and ds.StudyInstanceUID == study_uid:
                    return p
            return None

        wait_for(lambda: sr() is not None, 60, "SR of the new study delivered")
    finally:
        serve.stop()
        dest.stop()
    with db.connect() as conn:
        job = conn.execute(text("SELECT j.id, j.bundle_name, j.bundle_version FROM jobs j JOIN studies s "
                                "ON s.id = j.study_id WHERE s.study_instance_uid = :u"), {"u": study_uid}).one()
        served = conn.execute(text("SELECT probability, threshold FROM findings WHERE job_id = :j "
                                   "AND finding = 'Effusion (head)'"), {"j": job.id}).one()
        vector = conn.execute(text("SELECT vector FROM embeddings WHERE job_id = :j"), {"j": job.id}).scalar()
    db.dispose()
    assert (job.bundle_name, job.bundle_version) == ("demo", version)

    manifest = json.loads((tmp_path / "var" / "models" / model / "manifest.json").read_text())
    head = manifest["heads"][0]["head"]
    assert head["input"] == "unit_embedding" and head["training"]["n_images"] == 2 * PER_CLASS
    assert head["training"]["n_patients"] == 2 * PER_CLASS  # grouped by study: no patient column
    expected = 1 / (1 + np.exp(-(np.frombuffer(vector, np.float32).astype(np.float64) @ head["weights"]
                                 + head["bias"])))
    assert served.probability == pytest.approx(expected, abs=1e-5)
    assert served.threshold == pytest.approx(head["threshold"])

    items = _content(dcmread(sr()).ContentSequence)
    versions = {i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Version"}
    assert versions == {version}

    def probability_items(value: str) -> int:  # one NUM per finding, named by its code
        return sum(i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == value for i in items)

    # the encoder's Effusion and the head's share SNOMED CT 60046008: two findings, two NUMs
    assert probability_items("60046008") == 2 * probability_items("8186001") == 2
    probabilities = [float(i.MeasuredValueSequence[0].NumericValue) / 100 for i in items if i.ValueType == "NUM"
                     and i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"]
    assert any(p == pytest.approx(served.probability, abs=1e-4) for p in probabilities)
    parameters = {i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"}
    assert f"operating_threshold={head['threshold']:.6g}" in parameters
