"""``pleura send`` of a folder with files it cannot send: the others are stored, one line for each bad one, exit 1."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmwrite

from tests.dicom_node.test_scu import peer, write_instance  # noqa: F401
from tests.security.make_corpus import base_dataset
from worker.cli import main

NOT_DICOM = "unreadable: not a DICOM file with a File Meta header"


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """Two good instances, a text file and a DICOM data set without a File Meta header; the good UIDs."""
    monkeypatch.setenv("PLEURA_DATA_DIR", str(tmp_path / "var"))
    studies = tmp_path / "studies"
    studies.mkdir()
    uids = [write_instance(studies / "1.dcm", "cli-1").SOPInstanceUID,
            write_instance(studies / "4.dcm", "cli-4").SOPInstanceUID]
    (studies / "2.txt").write_text("notes, not DICOM\n")
    dcmwrite(studies / "3.dcm", base_dataset("cli-no-meta"), implicit_vr=True, little_endian=True)  # no meta
    return studies, uids


def test_send_stores_the_good_files_and_reports_each_bad_one(
        peer: tuple[int, list[Callable[[], None]]], folder: tuple[Path, list[str]],  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    port, _ = peer
    studies, uids = folder
    with pytest.raises(SystemExit) as exc:
        main(["send", "127.0.0.1", str(port), str(studies)])
    assert exc.value.code == 1
    assert capsys.readouterr().out.splitlines() == [
        f"0x0000  {studies / '1.dcm'}",
        f"not sent  {studies / '2.txt'}  ({NOT_DICOM})",
        f"not sent  {studies / '3.dcm'}  ({NOT_DICOM})",
        f"0x0000  {studies / '4.dcm'}",
        "2 sent, 2 failed",
    ]
    with pytest.raises(SystemExit) as exc:
        main(["send", "127.0.0.1", str(port), str(studies), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert exc.value.code == 1 and (report["sent"], report["failed"]) == (2, 2)
    assert [(r["sop_instance_uid"], r["status"], r["ok"], r["error"]) for r in report["results"]] == [
        (uids[0], "0x0000", True, None), ("", None, False, NOT_DICOM), ("", None, False, NOT_DICOM),
        (uids[1], "0x0000", True, None)]
