"""Must show 1: `pleura serve` on embedded defaults; storescu in, SR + SC out to storescp."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from tests.e2e.harness import embedded_env, pleura, pleura_run, storescp, wait_for, wait_port
from tests.support import free_port, require_tool

QUIET = 3


@pytest.mark.integration
def test_serve_receives_processes_and_delivers(real_cr: Path, tmp_path: Path, dciodvfy, dsrdump) -> None:  # type: ignore[no-untyped-def]
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = embedded_env(tmp_path, port, dest_port, QUIET)
    serve = pleura("serve", env, tmp_path / "serve.log")
    try:
        wait_port(port, serve, timeout=120)
        sent = subprocess.run([require_tool("storescu"), "-xw", "-aet", "MODALITY", "-aec", "PLEURA",
                               "127.0.0.1", str(port), str(real_cr)], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr

        def two_objects() -> list[Path]:
            files = sorted((tmp_path / "received").iterdir())
            return files if len(files) >= 2 else []

        received = wait_for(two_objects, QUIET + 30, "an SR and an SC at the destination")
        source = dcmread(real_cr, stop_before_pixels=True)
        objects = [dcmread(f) for f in received]
        assert {o.SOPClassUID for o in objects} == {Comprehensive3DSRStorage, SecondaryCaptureImageStorage}
        assert {o.StudyInstanceUID for o in objects} == {source.StudyInstanceUID}
        assert {o.PatientID for o in objects} == {source.PatientID}
        assert len(objects) == 2
        for path, obj in zip(received, objects, strict=True):  # what a PACS receives must validate
            errors, _warnings = dciodvfy(path)
            assert errors == [], f"{obj.Modality}: {errors}"
            if obj.Modality == "SR":
                assert dsrdump(path).returncode == 0

        status = json.loads(pleura_run(env, "status", "--json"))
        assert status[0]["study_instance_uid"] == source.StudyInstanceUID
        assert status[0]["state"] == "DONE" and status[0]["deliveries"] == {"DELIVERED": 2}
        assert status[0]["calling_ae"] == ["MODALITY"]
        log = (tmp_path / "serve.log").read_text()
        for phi in (str(source.PatientName), source.PatientID, source.PatientBirthDate):
            assert phi and phi not in log, "patient identifiers must never reach the logs"
    except BaseException:
        print(serve.tail())
        raise
    finally:
        serve.stop()
        dest.stop()
