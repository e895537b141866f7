"""The report labeler (issue 19): the rules on targeted sentences, their accuracy on the committed set,
a site's own labeler (``PLEURA_REPORT_LABELER``) and ``pleura reports label``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench.labeler import SET, evaluate, predict, read_set
from worker.reports.labeler import Label, load
from worker.reports.rules import RuleLabeler, sections

PLEURA = str(Path(sys.executable).with_name("pleura"))
ROOT = Path(__file__).resolve().parents[3]
DEMO = ["Cardiomegaly", "Effusion", "Atelectasis", "Abnormal"]


def one(text: str, finding: str) -> Label | None:
    return RuleLabeler().label(text, [finding])[finding]


@pytest.mark.parametrize("text, finding, expected", [
    # negation, before and after the mention
    ("No pleural effusion.", "Effusion", "absent"),
    ("Lungs are clear without focal consolidation.", "Consolidation", "absent"),
    ("Negative for pneumothorax.", "Pneumothorax", "absent"),
    ("The lungs are free of consolidation.", "Consolidation", "absent"),
    ("Pulmonary nodules are not seen.", "Nodule", "absent"),
    ("No evidence of pneumothorax, pleural effusion, focal consolidation, or pulmonary edema.", "Edema", "absent"),
    ("No change in the small bilateral effusions.", "Effusion", "present"),  # a pseudo-trigger
    ("The pleural effusion has decreased but not resolved.", "Effusion", "present"),
    # uncertainty
    ("Possible small right pleural effusion.", "Effusion", "uncertain"),
    ("A small pneumothorax cannot be excluded.", "Pneumothorax", "uncertain"),
    ("Opacity at the left base may represent atelectasis or pneumonia.", "Atelectasis", "uncertain"),
    ("Right basilar atelectasis versus consolidation.", "Consolidation", "uncertain"),
    ("Right basilar atelectasis vs. consolidation.", "Atelectasis", "uncertain"),
    ("Patchy consolidation concerning for pneumonia.", "Consolidation", "present"),
    ("No consolidation to suggest pneumonia.", "Pneumonia", "absent"),  # negation beats uncertainty
    ("Blunting of the left costophrenic angle, which may represent a small effusion.", "Effusion", "uncertain"),
    ("Blunting of the left costophrenic angle.", "Effusion", "present"),
    ("Mass-like opacity in the right upper lobe.", "Mass", "uncertain"),
    # scope: termination terms and a new sentence or clause
    ("There is no focal consolidation, but there is a small left pleural effusion.", "Effusion", "present"),
    ("No pneumothorax, small left effusion.", "Effusion", "present"),
    ("Possible small effusion. Right lower lobe consolidation.", "Consolidation", "present"),
    # resolution and history
    ("Previously seen effusion has resolved.", "Effusion", "absent"),
    ("Resolved left basilar atelectasis.", "Atelectasis", "absent"),
    ("The right effusion is no longer seen.", "Effusion", "absent"),
    ("Interval resolution of the right pneumothorax.", "Pneumothorax", "absent"),
    ("History of right lower lobe pneumonia.", "Pneumonia", None),
    # laterality
    ("Left pleural effusion.", "Effusion", "present"),
    ("No right effusion; small left effusion.", "Effusion", "present"),
    ("Small right effusion, left effusion has resolved.", "Effusion", "present"),
    # near-misses
    ("Heart size is normal.", "Cardiomegaly", "absent"),
    ("The cardiomediastinal silhouette is within normal limits.", "Cardiomegaly", "absent"),
    ("The heart is mildly enlarged.", "Cardiomegaly", "present"),
    ("Small pericardial effusion.", "Effusion", None),
    ("Pneumomediastinum.", "Pneumothorax", None),
    ("Mass effect on the trachea.", "Mass", None),
    ("Extensive subcutaneous emphysema.", "Emphysema", None),
    ("Soft tissue edema of the chest wall.", "Edema", None),
    ("Vertebral body collapse at T12.", "Atelectasis", None),
    # Abnormal
    ("No acute cardiopulmonary abnormality.", "Abnormal", "absent"),
    ("Normal chest.", "Abnormal", "absent"),
    ("Small pericardial effusion.", "Abnormal", "present"),
    ("No pneumothorax. Small left effusion.", "Abnormal", "present"),
    ("Possible small left effusion.", "Abnormal", "uncertain"),
    ("Comparison: none.", "Abnormal", None),
])
def test_rules(text: str, finding: str, expected: Label | None) -> None:
    assert one(text, finding) == expected


def test_sections_ignore_history_and_indication() -> None:
    text = ("INDICATION: History of cardiomegaly, rule out effusion.\nTECHNIQUE: PA and lateral.\n"
            "COMPARISON: Prior study with left lower lobe pneumonia.\nFINDINGS: Lungs are clear.\n"
            "IMPRESSION: No acute cardiopulmonary abnormality.")
    assert [kind for kind, _ in sections(text)] == ["findings", "impression"]
    labels = RuleLabeler().label(text, ["Cardiomegaly", "Effusion", "Pneumonia", "Abnormal"])
    assert labels == {"Cardiomegaly": None, "Effusion": None, "Pneumonia": None, "Abnormal": "absent"}
    assert one("Cardiomegaly. Small effusion.", "Cardiomegaly") == "present"  # no headings: all of it is used


def test_the_impression_wins_for_what_it_mentions() -> None:
    text = "FINDINGS: Possible small right effusion. Mild cardiomegaly. IMPRESSION: No pleural effusion."
    assert RuleLabeler().label(text, ["Effusion", "Cardiomegaly"]) == {"Effusion": "absent", "Cardiomegaly": "present"}
    assert one("FINDINGS: No effusion. IMPRESSION: Small left effusion.", "Effusion") == "present"


def test_head_names_case_and_unknown_findings() -> None:
    labels = RuleLabeler().label("Small left effusion. Apical pleural thickening.",
                                 ["Effusion (head)", "effusion", "Pleural_Thickening", "pleural thickening", "Foo"])
    assert labels == {"Effusion (head)": "present", "effusion": "present", "Pleural_Thickening": "present",
                      "pleural thickening": "present", "Foo": None}


def test_the_fourteen_findings_and_abnormal_are_known() -> None:
    text = ("Atelectasis, cardiomegaly, effusion, infiltrate, mass, nodule, pneumonia, pneumothorax, consolidation, "
            "edema, emphysema, fibrosis, pleural thickening and a hiatal hernia.")
    names = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
             "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "Abnormal"]
    assert RuleLabeler().label(text, names) == dict.fromkeys(names, "present")


# --- the committed set ----------------------------------------------------------------------------------

#: measured with bench/labeler.py (docs/monitoring.md), less a margin: a regression fails, not a tie
FLOOR = {"development": {"accuracy": 0.997, "present": 0.996, "absent": 1.0, "uncertain": 0.991},
         "held-out": {"accuracy": 0.926, "present": 0.987, "absent": 0.915, "uncertain": 0.957}}
MARGIN = 0.02


def test_the_set_is_large_and_covers_the_findings() -> None:
    rows = read_set(SET)
    parts = {part: [r for r in rows if r.id.startswith(f"{part}-")] for part in ("dev", "held")}
    assert len(rows) == len(parts["dev"]) + len(parts["held"]) and len({r.text for r in rows}) >= 250
    assert len({r.text for r in parts["held"]}) >= 50
    covered = {r.finding for r in rows}
    assert {"Cardiomegaly", "Effusion", "Atelectasis", "Pneumothorax", "Consolidation", "Edema", "Nodule", "Mass",
            "Abnormal"} <= covered
    assert {r.label for r in parts["dev"]} == {r.label for r in parts["held"]} == {"present", "absent", "uncertain"}


def test_accuracy_on_the_set_stays_at_least_as_measured() -> None:
    rows = read_set(SET)
    result = evaluate(rows, predict(rows, RuleLabeler()))
    for part, floor in FLOOR.items():
        overall = result[part]["overall"]
        assert overall["accuracy"] >= floor["accuracy"] - MARGIN, (part, overall)
        for cls in ("present", "absent", "uncertain"):
            assert overall[cls]["f1"] >= floor[cls] - MARGIN, (part, cls, overall[cls])


# --- a site's own labeler -------------------------------------------------------------------------------

class SiteLabeler:
    """What a site plugs in: every finding present when the text says 'positive'."""

    name = "site-test/1"

    def label(self, text: str, findings: Sequence[str]) -> dict[str, Label | None]:
        return dict.fromkeys(findings, "present" if "positive" in text else None)


class NoLabel:
    name = "broken/1"


def test_load_a_site_labeler_and_the_default() -> None:
    site = load("tests.worker.reports.test_rules:SiteLabeler")
    assert site.name == "site-test/1" and site.label("positive", ["Effusion"]) == {"Effusion": "present"}
    assert load(None).name == load("").name == "pleura-rules/1"


@pytest.mark.parametrize("spec, message", [
    ("tests.worker.reports.test_rules", "expected module:attribute"),
    ("no_such_module_here:Labeler", "cannot import it"),
    ("tests.worker.reports.test_rules:Missing", "cannot import it"),
    ("tests.worker.reports.test_rules:NoLabel", "need a name and a label"),
])
def test_a_bad_spec_says_why(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load(spec)


# --- pleura reports label --------------------------------------------------------------------------------

def pleura(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PLEURA_DATA_DIR": str(data_dir), **(env or {})}
    return subprocess.run([PLEURA, *args], capture_output=True, text=True, timeout=120, env=env)


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_cli_labels_every_finding_of_the_model(tmp_path: Path) -> None:
    reports = _csv(tmp_path / "reports.csv", 'id,text,other\n'
                   'r1,"FINDINGS: Small left pleural effusion. Heart size is normal.",x\n'
                   'r2,No acute cardiopulmonary abnormality.,y\n'
                   'r3,"INDICATION: atelectasis. FINDINGS: Possible left lower lobe atelectasis.",z\n')
    done = pleura("reports", "label", str(reports), "--json", data_dir=tmp_path / "var")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        {"id": "r1", "labels": {"Cardiomegaly": "absent", "Effusion": "present", "Atelectasis": None,
                                "Abnormal": "present"}},
        {"id": "r2", "labels": {"Cardiomegaly": None, "Effusion": None, "Atelectasis": None, "Abnormal": "absent"}},
        {"id": "r3", "labels": {"Cardiomegaly": None, "Effusion": None, "Atelectasis": "uncertain",
                                "Abnormal": "uncertain"}},
    ]
    table = pleura("reports", "label", str(reports), "--model", "demo", data_dir=tmp_path / "var")
    assert table.returncode == 0, table.stderr
    header, r1 = table.stdout.splitlines()[:2]
    assert header.split() == ["id", *DEMO] and r1.split() == ["r1", "absent", "present", "-", "present"]


def test_cli_uses_the_sites_labeler(tmp_path: Path) -> None:
    reports = _csv(tmp_path / "reports.csv", "id,text\na,positive\nb,nothing\n")
    env = {"PLEURA_REPORT_LABELER": "tests.worker.reports.test_rules:SiteLabeler", "PYTHONPATH": str(ROOT)}
    done = pleura("reports", "label", str(reports), "--json", data_dir=tmp_path / "var", env=env)
    assert done.returncode == 0, done.stderr
    assert [r["labels"] for r in json.loads(done.stdout)] == [dict.fromkeys(DEMO, "present"), dict.fromkeys(DEMO)]


@pytest.mark.parametrize("content, message", [
    (b"id,body\n1,No effusion.\n", "no 'text' column (it has: id, body)"),
    (b"text\nNo effusion.\n", "no 'id' column"),
    (b"id,text\n1,caf\xe9\n", "is not UTF-8 text"),
    (None, "no such file"),
])
def test_cli_says_what_is_wrong_with_the_file(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "reports.csv"
    if content is not None:
        path.write_bytes(content)
    done = pleura("reports", "label", str(path), "--json", data_dir=tmp_path / "var")
    assert done.returncode == 1 and message in done.stderr and not done.stdout
