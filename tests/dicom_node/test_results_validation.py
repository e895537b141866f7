"""SR and SC built from several NIH-derived studies all pass dciodvfy and dsrdump."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.results.content import Algorithm, ImageResult
from dicom_node.results.sc import build_sc
from dicom_node.results.sr import build_sr
from dicom_node.results.uids import derive_uid
from tests.dicom_node.node_helpers import decode_unit, make_findings
from worker.synth.studies import png_to_dataset, read_labels

#: Rows of labels.csv: PA and AP, male and female, portrait and landscape matrices.
ROWS = (0, 1, 6, 9)


@pytest.mark.parametrize("index", ROWS)
def test_results_for_nih_study_validate(index: int, nih_dir: Path, algorithm: Algorithm,
                                        summary, tmp_path: Path, dciodvfy, dsrdump) -> None:
    row = read_labels(nih_dir / "labels.csv")[index]
    modality = "DX" if index % 2 else "CR"
    source = png_to_dataset(nih_dir / "images" / row["image"], row, modality=modality)
    result = ImageResult(source, decode_unit(source), make_findings(index))
    study = source.StudyInstanceUID
    sr = build_sr([result], algorithm, study_summary=summary,
                  series_instance_uid=derive_uid("sr-series", study),
                  sop_instance_uid=derive_uid("sr", study), series_number=9001,
                  instance_number=1)
    sc = build_sc(result, algorithm, series_instance_uid=derive_uid("sc-series", study),
                  sop_instance_uid=derive_uid("sc", source.SOPInstanceUID), series_number=9002,
                  instance_number=1)
    for name, ds in (("sr.dcm", sr), ("sc.dcm", sc)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        assert dciodvfy(tmp_path / name) == ([], []), name
    assert dsrdump(tmp_path / "sr.dcm").returncode == 0
