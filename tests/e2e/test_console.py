"""Must show 3: the admin console of a real `pleura serve`, rendered by headless Chromium.

Three NIH studies go through `pleura serve` to a DCMTK storescp from an AE title with markup
in it (escaping is checked on the rendered page); an unlisted AE is rejected. Chromium's DOM
of each page is checked against the ledger's own view rows, and a screenshot of the studies
page goes to build/figures/console.png (copied to docs/console.png from such a run).
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.e2e.harness import PLEURA, embedded_env, pleura, pleura_run, running, storescp, wait_for, wait_port
from tests.figures import FIGURES_DIR, save
from tests.support import free_port
from worker.ledger.audit import human_seconds

QUIET = 1
N_STUDIES = 3
AE = "<i>CXR</i>"  # a legal AE title that must reach the page as text, not markup


def _chromium(binary: str, profile: Path, *args: str) -> str:
    done = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _row(dom: str, uid: str) -> str:
    rows = [r for r in re.findall(r"<tr>.*?</tr>", dom, re.S) if f">{uid}</a>" in r]
    assert len(rows) == 1, f"one row for {uid}"
    return rows[0]


@pytest.mark.integration
def test_console_pages_in_headless_chromium(nih: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package `chromium`; bash .ci/run installs it)")
    started = time.monotonic()
    inputs = tmp_path / "inputs"
    pleura_run({}, "synth", "--images", str(nih / "images"), "--labels", str(nih / "labels.csv"),
               "--out", str(inputs), "--limit", str(N_STUDIES))
    headers = [dcmread(p, stop_before_pixels=True) for p in sorted(inputs.glob("*.dcm"))]
    studies = {h.StudyInstanceUID for h in headers}
    assert len(studies) == N_STUDIES

    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port, http_port = free_port(), free_port()
    env = {**embedded_env(tmp_path, port, dest_port, QUIET), "PLEURA_HTTP_PORT": str(http_port),
           "PLEURA_ALLOWED_CALLING_AES": AE}
    serve = pleura("serve", env, tmp_path / "serve.log")
    with running(serve, dest):
        wait_port(port, serve, timeout=120)
        wait_port(http_port, serve)
        pleura_run({}, "send", "127.0.0.1", str(port), str(inputs), "--calling-ae", AE)
        refused = subprocess.run([PLEURA, "send", "127.0.0.1", str(port), str(inputs), "--calling-ae", "INTRUDER"],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0
        db = sqlite3.connect(tmp_path / "var" / "pleura.db")

        def delivered() -> bool:
            done = db.execute("SELECT count(*) FROM v_study_timeline WHERE is_current = 1 AND study_state = 'DONE' "
                              "AND delivered_at IS NOT NULL").fetchone()[0]
            rejected = db.execute("SELECT count(*) FROM v_failures WHERE kind = 'association_rejected'").fetchone()[0]
            return done == N_STUDIES and rejected == 1

        wait_for(delivered, 120, "all studies processed and delivered, the intruder's rejection recorded")
        totals = dict(db.execute("SELECT study_instance_uid, total_s FROM v_study_timeline").fetchall())
        db.close()
        processed = time.monotonic()

        profile = tmp_path / "chromium"
        base = f"http://127.0.0.1:{http_port}"
        home = _chromium(chromium, profile, "--dump-dom", f"{base}/")
        assert "<h1>Studies</h1>" in home and f'<span class="s DONE">DONE</span> {N_STUDIES}' in home
        for uid in studies:
            row = _row(home, uid)
            assert '<span class="s DONE">DONE</span>' in row and "demo 0.1.0" in row
            assert f'<td class="n">{human_seconds(totals[uid])}</td>' in row  # the view's time to result
            assert "&lt;i&gt;CXR&lt;/i&gt;" in row and "<i>CXR</i>" not in row
            assert '<td class="n">2/2</td>' in row  # SR and SC delivered
        assert "no studies match" in _chromium(chromium, profile, "--dump-dom", f"{base}/?state=failed")

        uid = sorted(studies)[0]
        study = _chromium(chromium, profile, "--dump-dom", f"{base}/study?uid={uid}")
        for text in (uid, "job_succeeded", "study_queued", f"DEST@127.0.0.1:{dest_port}", ">SR<", ">SC<",
                     '<span class="s DELIVERED">DELIVERED</span>', "&lt;i&gt;CXR&lt;/i&gt;"):
            assert text in study, text
        failures = _chromium(chromium, profile, "--dump-dom", f"{base}/failures")
        assert "association_rejected" in failures and "INTRUDER@127.0.0.1" in failures
        models = _chromium(chromium, profile, "--dump-dom", f"{base}/models")
        assert re.search(r"<td[^>]*>demo</td><td[^>]*>0\.1\.0</td><td[^>]*>[^<]+</td><td class=\"n\">3</td>", models)
        for page in (home, study, failures, models):  # nothing of the patients reaches the console
            for h in headers:
                assert str(h.PatientName) not in page and h.PatientID not in page
                assert h.PatientBirthDate not in page

        png = FIGURES_DIR / "console.png"
        FIGURES_DIR.mkdir(parents=True, exist_ok=True)
        png.unlink(missing_ok=True)
        _chromium(chromium, profile, f"--screenshot={png}", "--window-size=1280,800", f"{base}/")
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert (int.from_bytes(data[16:20]), int.from_bytes(data[20:24])) == (1280, 800)
        save("console", {"studies": N_STUDIES, "screenshot": str(png), "png_bytes": len(data),
                         "seconds_to_all_delivered": round(processed - started, 1),
                         "seconds_chromium_pages": round(time.monotonic() - processed, 1),
                         "time_to_result_s": sorted(totals.values())})
