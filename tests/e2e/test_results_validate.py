"""Issue 4, must show 1, 2 and 4, and issue 14, must show 2: what the demo model really produces
for 20 NIH-derived studies and the real CR is valid DICOM (0 errors from dciodvfy, dsrdump and
pixelmed's DicomSRValidator), has one region per positive finding on the right image, and
ineligible studies (lateral only, not chest) get ledger reasons and no findings: the lateral
chest study a not-analysed SR instead (issue 14, "Not analysed" is visible), the knee study
nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage, generate_uid

from tests.e2e.harness import embedded_env, pleura, pleura_run, storescp, wait_for, wait_port
from tests.support import free_port

QUIET = 2
N_STUDIES = 20


@pytest.mark.integration
def test_demo_results_validate_and_ineligible_studies_get_reasons(  # type: ignore[no-untyped-def]
    nih: Path, real_cr: Path, tmp_path: Path, dciodvfy, dsrdump, pixelmed_sr
) -> None:
    inputs = tmp_path / "inputs"
    pleura_run({}, "synth", "--images", str(nih / "images"), "--labels", str(nih / "labels.csv"),
               "--out", str(inputs), "--limit", str(N_STUDIES), "--transfer-syntax", "j2k")
    lateral, knee = dcmread(real_cr), dcmread(real_cr)
    for ds, attrs in ((lateral, {"ViewPosition": "LL"}), (knee, {"BodyPartExamined": "KNEE"})):
        ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for key, value in attrs.items():
            setattr(ds, key, value)
    lateral.save_as(inputs / "lateral.dcm")
    knee.save_as(inputs / "knee.dcm")
    (inputs / "rg1.dcm").write_bytes(real_cr.read_bytes())

    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    env = embedded_env(tmp_path, port, dest_port, QUIET)
    serve = pleura("serve", env, tmp_path / "serve.log")
    expected = 2 * (N_STUDIES + 1) + 1  # SR + SC per eligible single-image study, the lateral's notice
    try:
        wait_port(port, serve, timeout=120)
        pleura_run({}, "send", "127.0.0.1", str(port), str(inputs))
        db = sqlite3.connect(tmp_path / "var" / "pleura.db")
        wait_for(lambda: db.execute("SELECT count(*) FROM studies WHERE state = 'DONE'").fetchone()[0]
                 == N_STUDIES + 3 and db.execute("SELECT count(*) FROM deliveries WHERE state <> 'DELIVERED'"
                                                 ).fetchone()[0] == 0, 240, "all studies processed and delivered")
        files = sorted((tmp_path / "received").iterdir())
        assert len(files) == expected

        reasons = dict(db.execute("SELECT sop_instance_uid, ineligible_reason FROM instances "
                                  "WHERE ineligible_reason IS NOT NULL").fetchall())
        assert reasons == {lateral.SOPInstanceUID: "view LL not in intended use ['AP', 'PA']",
                           knee.SOPInstanceUID: "body part KNEE not in intended use ['CHEST']"}
        notes = dict(db.execute("SELECT note, count(*) FROM studies WHERE note IS NOT NULL GROUP BY note"))
        assert notes == {"no eligible images": 1, "no eligible images; not-analysed SR produced": 1}
        positives = {}
        for sop, finding in db.execute("SELECT i.sop_instance_uid, f.finding FROM findings f "
                                       "JOIN instances i ON i.id = f.instance_id WHERE f.positive"):
            positives.setdefault(sop, set()).add(finding)
        db.close()

        srs, notices = [], []
        for path in files:
            errors, _warnings = dciodvfy(path)
            assert errors == [], f"{path.name}: {errors}"
            header = dcmread(path, stop_before_pixels=True)
            if header.SOPClassUID == EnhancedSRStorage:  # the not-analysed SR (its validators: issue 14's tests)
                notices.append(header.StudyInstanceUID)
                assert dsrdump(path).returncode == 0
            if header.SOPClassUID != Comprehensive3DSRStorage:
                continue
            srs.append(path)
            assert dsrdump(path).returncode == 0
            report = hd.sr.srread(path)
            source = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
            sop = source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            groups = report.content.get_planar_roi_measurement_groups()
            names = {g.finding_type.meaning for g in groups}
            if positives.get(sop):
                assert len(groups) == len(positives[sop]), (sop, names, positives[sop])
            else:  # nothing positive: the triage score is marked, Absent (OHIF needs one group)
                assert names == {"Abnormal"} and len(groups) == 1, (sop, names)
                (evaluation,) = groups[0].get_qualitative_evaluations(name=groups[0].finding_type)
                assert evaluation.value.value == "272519000"  # Absent
            for group in groups:
                reference = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
                assert reference.ReferencedSOPInstanceUID == sop  # the region lies on the right image
        assert len(srs) == N_STUDIES + 1
        assert notices == [lateral.StudyInstanceUID]
        pixelmed = pixelmed_sr(srs)
        assert {path.name: errors for path, (errors, _) in pixelmed.items() if errors} == {}
        warnings = sorted({line.split(": ")[-1] for _, lines in pixelmed.values() for line in lines})
        print(f"pixelmed DicomSRValidator: {len(srs)} SRs, 0 errors; kinds of warning: {warnings}")
    except BaseException:
        print(serve.tail())
        raise
    finally:
        serve.stop()
        dest.stop()
