"""Issue 19 end to end: 30 NIH-derived studies through `pleura listen` and `pleura worker` on PostgreSQL,
their final reports from the RIS (texts written from the NIH labels, with negations, uncertainty,
resolved and historical mentions) over MLLP by the ``hl7`` library's client and as FHIR
DiagnosticReports; `pleura monitor` against a computation by hand; a report that arrives before its
study; a correction that replaces the labels; `pleura heads train --labels-from-reports`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import create_engine, text

from tests.e2e.harness import PLEURA, pleura, pleura_run, running, storescp, wait_port
from tests.figures import save
from tests.reliability.services import pleura_env
from tests.ris import TOKEN, diagnostic_report, msa, oru, post_fhir, send_hl7
from tests.support import free_port, wait_for
from worker.synth.studies import png_to_dataset

pytestmark = pytest.mark.integration

STUDIES, EFFUSIONS = 30, 10
FINDINGS = ("Cardiomegaly", "Effusion", "Atelectasis", "Abnormal")
OTHERS = {"Nodule": "Right upper lobe nodule.", "Mass": "Left lower lobe mass.",
          "Infiltration": "Diffuse interstitial infiltrates.", "Consolidation": "Right lower lobe consolidation.",
          "Pneumothorax": "Small right apical pneumothorax.", "Emphysema": "Hyperinflated lungs with emphysema.",
          "Fibrosis": "Reticular opacities consistent with pulmonary fibrosis.",
          "Pleural_Thickening": "Left apical pleural thickening.", "Edema": "Mild interstitial pulmonary edema.",
          "Pneumonia": "Right lower lobe pneumonia.", "Hernia": "Hiatal hernia."}


def _rows(nih: Path) -> list[dict[str, str]]:
    """30 rows of the NIH sample in file order, the first 10 with an effusion among them."""
    rows = list(csv.DictReader((nih / "labels.csv").open()))
    effusion = [r for r in rows if "Effusion" in r["findings"].split("|")][:EFFUSIONS]
    return effusion + [r for r in rows if r not in effusion][:STUDIES - EFFUSIONS]


def report(row: dict[str, str], i: int, flip_effusion: bool = False) -> tuple[str, dict[str, str | None]]:
    """A radiologist's report from the NIH labels, and the labels it says per finding.

    Varied as reports are: sections, a history of effusion in the indication (not a finding), a
    resolved effusion, uncertain mentions (only where another finding is certain, so that the study is
    still plainly abnormal), other findings by name, and the usual normal impression.
    """
    present = set(row["findings"].split("|")) - {"No Finding"}
    if flip_effusion:
        present ^= {"Effusion"}
    others = [OTHERS[f] for f in sorted(present & set(OTHERS))]
    hedge = bool(others) or len(present) > 1
    labels: dict[str, str | None] = {}
    findings, impression = [], []
    if "Cardiomegaly" in present:
        findings.append("The heart is enlarged.")
        impression.append("Cardiomegaly.")
        labels["Cardiomegaly"] = "present"
    else:
        findings.append("Heart size is normal.")
        labels["Cardiomegaly"] = "absent"
    if "Effusion" in present and hedge and i % 6 == 3:
        findings.append("Possible small right pleural effusion.")
        impression.append("Possible small right pleural effusion.")
        labels["Effusion"] = "uncertain"
    elif "Effusion" in present:
        sentence = "Small left pleural effusion." if i % 2 else "Moderate right pleural effusion."
        findings.append(sentence)
        impression.append(sentence)
        labels["Effusion"] = "present"
    else:
        findings.append("The previously seen left pleural effusion has resolved." if i % 5 == 2
                        else "No pleural effusion.")
        labels["Effusion"] = "absent"
    if "Atelectasis" in present and hedge and i % 7 == 4:
        findings.append("Patchy opacity in the left lower lobe may represent atelectasis.")
        impression.append("Left basilar opacity, possibly atelectasis.")
        labels["Atelectasis"] = "uncertain"
    elif "Atelectasis" in present:
        findings.append("Bibasilar atelectasis.")
        impression.append("Bibasilar atelectasis.")
        labels["Atelectasis"] = "present"
    else:
        findings.append("No atelectasis.")
        labels["Atelectasis"] = "absent"
    findings += others
    impression += others
    labels["Abnormal"] = "present" if present else "absent"
    indication = "INDICATION: History of pleural effusion.\n" if i % 4 == 1 else "INDICATION: Cough.\n"
    body = (f"{indication}FINDINGS: {' '.join(findings)}\n"
            f"IMPRESSION: {' '.join(impression) or 'No acute cardiopulmonary abnormality.'}")
    return body, labels


def _wilson(k: int, n: int) -> tuple[float, float, float] | None:
    if n == 0:
        return None
    z, p = 1.959963984540054, k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(
        p * (1 - p) / n + z * z / (4 * n * n))
    return p, max(0.0, centre - half), min(1.0, centre + half)


def _by_hand(pairs: list[tuple[bool, float, bool]]) -> dict[str, float | None]:
    """Sensitivity ... NPV and the AUC (Mann-Whitney, ties half) of (truth, score, call) triples."""
    tp = sum(t and c for t, _, c in pairs)
    fp = sum(not t and c for t, _, c in pairs)
    tn = sum(not t and not c for t, _, c in pairs)
    fn = sum(t and not c for t, _, c in pairs)
    positives = [s for t, s, _ in pairs if t]
    negatives = [s for t, s, _ in pairs if not t]
    auc = (sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives) / (len(positives) * len(negatives))
           if positives and negatives else None)
    return {"sensitivity": _wilson(tp, tp + fn), "specificity": _wilson(tn, tn + fp),
            "ppv": _wilson(tp, tp + fp), "npv": _wilson(tn, tn + fn), "auc": auc}


def test_reports_to_monitor(nih: Path, pg_url: str, amqp_url: str, tmp_path: Path) -> None:
    rows = _rows(nih)
    folder = tmp_path / "studies"
    folder.mkdir()
    studies = []
    for row in rows:
        path = folder / f"{Path(row['image']).stem}.dcm"
        png_to_dataset(nih / "images" / row["image"], row).save_as(path, enforce_file_format=True)
        ds = dcmread(path, stop_before_pixels=True)
        studies.append({"uid": str(ds.StudyInstanceUID), "accession": str(ds.AccessionNumber), "row": row})
    early = folder / "early"  # the study whose report comes first: sent after it
    early.mkdir()
    first = folder / f"{Path(rows[0]['image']).stem}.dcm"
    first.rename(early / first.name)

    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port, hl7_port, http_port = free_port(), free_port(), free_port()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    env = {**pleura_env(tmp_path, pg_url, amqp_url, port, f"DEST@127.0.0.1:{dest_port}"),
           "PLEURA_HL7_PORT": str(hl7_port), "PLEURA_HL7_ALLOWED_SENDERS": "RIS@127.0.0.1",
           "PLEURA_HTTP_PORT": str(http_port), "PLEURA_REPORTS_TOKEN_FILE": str(token)}
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, tmp_path / "listen.log")
    worker = pleura("worker", {**env, "PLEURA_HTTP_PORT": str(free_port())}, tmp_path / "worker.log")
    engine = create_engine(pg_url)

    def query(sql: str, **params: object) -> list:  # type: ignore[type-arg]
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    intended: dict[str, dict[str, str | None]] = {}
    with running(listen, worker, dest):
        wait_port(port, listen)
        wait_port(hl7_port, listen)

        # the first study's report comes before the study: stored, waiting
        body, intended[studies[0]["uid"]] = report(rows[0], 0)
        assert msa(send_hl7(hl7_port, oru("RPT-0", accession=studies[0]["accession"], text=body)))[0] == "AA"
        assert query("SELECT study_id FROM reports") == [(None,)]

        pleura_run(env, "send", "127.0.0.1", str(port), str(folder), "--calling-ae", "MODALITY")
        pleura_run(env, "send", "127.0.0.1", str(port), str(early), "--calling-ae", "MODALITY")
        wait_for(lambda: query("SELECT count(*) FROM studies WHERE state = 'DONE'")[0][0] == STUDIES, 240,
                 "every study analysed", interval=0.5)

        # the others: 19 over MLLP (accession in OBR-18), 10 as FHIR (5 by accession, 5 by study UID only)
        for i, study in enumerate(studies[1:], start=1):
            body, intended[study["uid"]] = report(study["row"], i)
            if i < 20:
                ack = msa(send_hl7(hl7_port, oru(f"RPT-{i}", accession=study["accession"], text=body)))
                assert ack[:2] == ("AA", f"RPT-{i}"), ack
            else:
                resource = diagnostic_report("final", text=body, rid=f"rpt-{i}",
                                             **({"accession": study["accession"]} if i < 25 else
                                                {"uid": study["uid"]}))
                status, _, outcome = post_fhir(http_port, resource)
                assert status == 201, outcome
        # a correction: the second effusion study's report said it wrongly
        corrected = next(s for i, s in enumerate(studies) if i > 0 and intended[s["uid"]]["Effusion"] == "present")
        index = studies.index(corrected)
        body, intended[corrected["uid"]] = report(corrected["row"], index, flip_effusion=True)
        assert intended[corrected["uid"]]["Effusion"] == "absent"
        ack = msa(send_hl7(hl7_port, oru(f"RPT-{index}-C", accession=corrected["accession"], status="C", text=body)))
        assert ack[0] == "AA", ack

        wait_for(lambda: query("SELECT count(*) FROM reports WHERE study_id IS NOT NULL AND superseded_at IS NULL "
                               "AND status IN ('final', 'corrected')")[0][0] == STUDIES, 60,
                 "every study matched to its current report", interval=0.5)

        # what the labeler said is what each report says
        stored = {uid: json.loads(labels) for uid, labels in query(
            "SELECT s.study_instance_uid, r.labels FROM reports r JOIN studies s ON s.id = r.study_id "
            "WHERE r.superseded_at IS NULL")}
        assert {uid: {f: stored[uid][f] for f in FINDINGS} for uid in stored} == intended

        # the early report matched once its study arrived; the correction replaced the report it corrects
        (received, matched, arrived), = query(
            "SELECT r.received_at, r.matched_at, s.first_received_at FROM reports r JOIN studies s "
            "ON s.id = r.study_id WHERE r.message_id = 'RPT-0'")
        assert received < arrived <= matched
        versions = query("SELECT r.status, r.superseded_at IS NOT NULL FROM reports r JOIN studies s "
                         "ON s.id = r.study_id WHERE s.study_instance_uid = :uid ORDER BY r.id", uid=corrected["uid"])
        assert versions == [("final", True), ("corrected", False)]

        monitor = subprocess.run([PLEURA, "monitor", "--json", "--window-days", "1", "--windows", "1", "--plots",
                                  str(tmp_path / "plots")], env={**os.environ, **env}, capture_output=True,
                                 text=True, timeout=120)
        assert monitor.returncode in (0, 2), monitor.stderr  # 2: an alarm, which 30 studies rarely give
        heads = json.loads(pleura_run(env, "heads", "train", "--from-ledger", "--labels-from-reports", "--finding",
                                      "Effusion", "--folds", "3", "--out", str(tmp_path / "head"), "--json"))

    # `pleura monitor` against a computation by hand from the ledger's outputs and the reports' labels
    scores = query("SELECT s.study_instance_uid, f.finding, max(f.probability), max(CASE WHEN f.positive "
                   "THEN 1 ELSE 0 END) FROM findings f JOIN jobs j ON j.id = f.job_id JOIN studies s "
                   "ON s.id = j.study_id WHERE j.state = 'SUCCEEDED' GROUP BY s.study_instance_uid, f.finding")
    engine.dispose()
    document = json.loads(monitor.stdout)
    got = {r["finding"]: r for r in document["records"]}
    assert sorted(got) == sorted(FINDINGS)
    figures = {}
    for finding in FINDINGS:
        pairs = [(intended[uid][finding] == "present", float(p), bool(c)) for uid, f, p, c in scores
                 if f == finding and intended[uid][finding] != "uncertain"]
        excluded = sum(intended[uid][finding] == "uncertain" for uid in intended)
        want, row = _by_hand(pairs), got[finding]
        assert (row["n"], row["positives"], row["excluded"]) == (len(pairs), sum(t for t, _, _ in pairs), excluded)
        for name in ("sensitivity", "specificity", "ppv", "npv"):
            if want[name] is None:
                assert row[name] is None
            else:
                have = row[name]
                assert (have["value"], have["low"], have["high"]) == pytest.approx(want[name], abs=1e-9), name
        assert row["auc"]["value"] == pytest.approx(want["auc"], abs=1e-12)
        figures[finding] = {"n": len(pairs), "positives": row["positives"], "excluded": excluded,
                            **{k: row[k] for k in ("sensitivity", "specificity", "auc")}, "alarms": row["alarms"]}
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == sorted(f"demo-0.1.0-{f}.png"
                                                                              for f in FINDINGS)
    effusion = [intended[uid]["Effusion"] for uid in intended if intended[uid]["Effusion"] != "uncertain"]
    assert heads["cross_validation"]["n"] == len(effusion)
    assert heads["cross_validation"]["n_positive"] == effusion.count("present")
    save("reports_monitor", {"studies": STUDIES, "reports_hl7": 21, "reports_fhir": 10, "figures": figures,
                             "head_effusion_cv_auc": heads["cross_validation"]["auc"],
                             "monitor_exit_status": monitor.returncode, "mean_probabilities": {
                                 f: float(np.mean([p for _, g, p, _ in scores if g == f])) for f in FINDINGS}})
