"""`pleura serve` stores every eligible image's embedding; `pleura search` finds the other studies."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.e2e.harness import PLEURA, embedded_env, pleura, pleura_run, running, storescp, wait_for, wait_port
from tests.support import free_port

QUIET = 2
N_STUDIES = 4


def _search(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PLEURA, "search", *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.integration
def test_serve_archives_embeddings_and_search_finds_the_other_studies(nih: Path, real_cr: Path,
                                                                      tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    pleura_run({}, "synth", "--images", str(nih / "images"), "--labels", str(nih / "labels.csv"),
               "--out", str(inputs), "--limit", str(N_STUDIES))
    lateral = dcmread(real_cr)  # ineligible: no embedding
    lateral.StudyInstanceUID, lateral.SOPInstanceUID, lateral.ViewPosition = generate_uid(), generate_uid(), "LL"
    lateral.file_meta.MediaStorageSOPInstanceUID = lateral.SOPInstanceUID
    lateral.save_as(inputs / "lateral.dcm")
    studies = {dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in inputs.glob("*.dcm")}
    assert len(studies) == N_STUDIES + 1

    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = embedded_env(tmp_path, port, dest_port, QUIET)
    serve = pleura("serve", env, tmp_path / "serve.log")
    with running(serve, dest):
        wait_port(port, serve, timeout=120)
        pleura_run({}, "send", "127.0.0.1", str(port), str(inputs))
        db = sqlite3.connect(tmp_path / "var" / "pleura.db")
        wait_for(lambda: db.execute("SELECT count(*) FROM studies WHERE state = 'DONE'").fetchone()[0]
                 == N_STUDIES + 1, 180, "all studies processed")
        rows = db.execute("SELECT s.study_instance_uid, i.sop_instance_uid, e.bundle_name, e.bundle_version, e.dim, "
                          "e.vector FROM embeddings e JOIN instances i ON i.id = e.instance_id "
                          "JOIN studies s ON s.id = e.study_id").fetchall()
        eligible = db.execute("SELECT count(*) FROM instances WHERE ineligible_reason IS NULL").fetchone()[0]
        db.close()
        assert eligible == N_STUDIES and len(rows) == N_STUDIES
        assert lateral.StudyInstanceUID not in {r[0] for r in rows}
        assert {(r[2], r[3], r[4]) for r in rows} == {("demo", "0.1.0", 160)}
        vectors = {r[0]: np.frombuffer(r[5], dtype=np.float32) for r in rows}
        assert [np.linalg.norm(v) for v in vectors.values()] == pytest.approx([1.0] * N_STUDIES, abs=1e-5)

        query = rows[0][0]
        found = json.loads(pleura_run(env, "search", "--like", query, "--json"))
        assert found["backend"] == "exact" and (found["bundle_name"], found["bundle_version"]) == ("demo", "0.1.0")
        hits = found["hits"]
        expected = sorted((float(vectors[query] @ v), uid) for uid, v in vectors.items() if uid != query)[::-1]
        assert [h["study_instance_uid"] for h in hits] == [uid for _, uid in expected]
        assert [h["score"] for h in hits] == pytest.approx([score for score, _ in expected], abs=1e-5)
        page = json.loads(pleura_run(env, "search", "--like", query, "--limit", "1", "--offset", "1", "--json"))
        assert [(h["rank"], h["study_instance_uid"]) for h in page["hits"]] == [(2, expected[1][1])]

        table = pleura_run(env, "search", "--like", rows[0][1])
        assert "backend exact" in table and expected[0][1] in table
        text_search = _search(env, "--text", "large heart")
        assert text_search.returncode != 0 and "bundle demo 0.1.0 has no text encoder" in text_search.stderr
        unknown = _search(env, "--like", "1.2.3.4.5")
        assert unknown.returncode != 0 and "1.2.3.4.5 is neither a Study nor a SOP Instance UID" in unknown.stderr
