"""`pleura heads train --from-ledger` with labels keyed by SOP Instance UID and a patient column,
and the refusals around ``--write-bundle`` (version clash, SR code)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from engines.heads import read_head
from tests.worker.archived import archive_studies
from worker.cli import main
from worker.ledger.db import Ledger, upgrade

N_PATIENTS = 16  # two studies each, one image per study; half the patients positive


@pytest.fixture
def labelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SQLite ledger of demo embeddings for 32 studies and a SOP-keyed labels CSV with patients."""
    monkeypatch.setenv("PLEURA_DATA_DIR", str(tmp_path / "var"))
    (tmp_path / "var").mkdir()
    url = f"sqlite:///{tmp_path / 'var' / 'pleura.db'}"
    upgrade(url)
    rng = np.random.default_rng(0)
    direction = rng.normal(size=160)
    rows, studies = [], {}
    for p in range(N_PATIENTS):
        for visit in range(2):
            uid = f"1.2.{p}.{visit}"
            positive = p % 2 == 0
            studies[uid] = [rng.normal(size=160) + (4.0 if positive else -4.0) * direction / np.linalg.norm(direction)]
            rows.append({"SOPInstanceUID": f"{uid}.1", "patient_id": f"P{p}", "Effusion": int(positive)})
    rows.append({"SOPInstanceUID": "1.9.9.1", "patient_id": "P99", "Effusion": 1})  # not in the ledger
    ledger = Ledger(url)
    archive_studies(ledger, studies)
    ledger.close()
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return labels


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return str(exc.value.code) + capsys.readouterr().err


def test_sop_keyed_labels_group_folds_by_patient_and_install_once(labelled: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    train = ["heads", "train", "--from-ledger", "--labels", str(labelled), "--finding", "Effusion", "--folds", "4",
             "--out", str(tmp_path / "out")]
    main([*train, "--write-bundle", "--version", "0.1.0+t1"])
    out = capsys.readouterr().out
    assert "(16/32 positive, 4 patient-level folds)" in out and "installed bundle version 0.1.0+t1" in out
    head = read_head(tmp_path / "out" / "head-Effusion.json")
    training = head["training"]
    assert (training["n_images"], training["n_patients"], training["n_rows_without_image"]) == (32, 16, 1)
    assert training["patients"] == "patient column" and head["input"] == "unit_embedding"
    assert training["cross_validation"]["auc"] > 0.9
    manifest = json.loads((tmp_path / "var" / "models" / "demo-0.1.0_t1" / "manifest.json").read_text())
    assert [h["name"] for h in manifest["heads"]] == ["Effusion (head)"]
    assert "exists: choose another --version" in _fails([*train, "--write-bundle", "--version", "0.1.0+t1"], capsys)
    pneumothorax = [*train[:6], "Pneumothorax", *train[7:]]
    assert "'Pneumothorax' is not labelled" in _fails(pneumothorax, capsys)
    with open(labelled, newline="") as f:
        rows = [{**r, "Pneumothorax": r["Effusion"]} for r in csv.DictReader(f)]
    with open(labelled, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert "give its SR code with --code" in _fails([*pneumothorax, "--write-bundle"], capsys)
    assert "--code must be VALUE,SCHEME,MEANING" in _fails([*pneumothorax, "--write-bundle", "--code", "36118008"],
                                                           capsys)
    main([*pneumothorax, "--write-bundle", "--code", "36118008,SCT,Pneumothorax"])
    assert "installed bundle version 0.1.0+head.Pneumothorax.1" in capsys.readouterr().out


def test_ledger_labels_need_a_uid_column(labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keyed_by_name = tmp_path / "names.csv"
    keyed_by_name.write_text("image,Effusion\na.png,1\n")
    assert "--from-ledger needs a StudyInstanceUID or SOPInstanceUID column" in _fails(
        ["heads", "train", "--from-ledger", "--labels", str(keyed_by_name), "--finding", "Effusion",
         "--out", str(tmp_path / "out")], capsys)
