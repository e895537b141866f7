"""Every common transfer syntax, encoded by DCMTK, goes through dcmsend -> SCP -> spool -> decode."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import select

from dicom_node.pixels import FASTEST_PLUGIN, _pixel_data, decode
from dicom_node.scp import StorageSCP
from dicom_node.spool import Spool
from tests.support import free_port, require_tool
from worker.ledger import Instance
from worker.ledger.db import Ledger, upgrade
from worker.listen.receiver import LedgerReceiver
from worker.synth.studies import png_to_dataset, read_labels

#: transfer syntax -> DCMTK command that converts an uncompressed file into it (None: pydicom)
CONVERSIONS = {
    ImplicitVRLittleEndian: ["dcmconv", "+ti"],
    DeflatedExplicitVRLittleEndian: ["dcmconv", "+td"],
    RLELossless: ["dcmcrle"],
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGExtended12Bit: ["dcmcjpeg", "+ee"],
    JPEGLSLossless: ["dcmcjpls"],
    JPEG2000Lossless: None,
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    from tests.support import NIH

    if not (NIH / "labels.csv").is_file():
        pytest.skip(f"NIH sample {NIH} absent: the shared data folder is not beside the repo")
    row = read_labels(NIH / "labels.csv")[0]
    ds = png_to_dataset(NIH / "images" / row["image"], row, modality="DX")
    path = tmp_path_factory.mktemp("src") / "explicit.dcm"
    ds.save_as(path, enforce_file_format=True)
    png = np.asarray(Image.open(NIH / "images" / row["image"]).convert("L").resize((ds.Columns, ds.Rows)))
    return path, png.astype(np.float32) / 255


@pytest.mark.parametrize("syntax", list(CONVERSIONS), ids=lambda uid: uid.name)
def test_transfer_syntax_round_trip(syntax: str, source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    original, expected = source
    encoded = tmp_path / "encoded.dcm"
    if CONVERSIONS[syntax] is None:
        ds = dcmread(original)
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(encoded, enforce_file_format=True)
    else:
        tool, *opts = CONVERSIONS[syntax]
        subprocess.run([require_tool(tool), *opts, str(original), str(encoded)], check=True, timeout=120)
    assert dcmread(encoded, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    ledger = Ledger(url)
    port = free_port()
    scp = StorageSCP("PLEURA", "127.0.0.1", port, Spool(tmp_path / "spool"), LedgerReceiver(ledger))
    scp.start()
    try:
        sent = subprocess.run([require_tool("dcmsend"), "-aec", "PLEURA", "127.0.0.1", str(port), str(encoded)],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
    finally:
        scp.stop()
    with ledger.session() as s:
        instance = s.scalars(select(Instance)).one()
    # dcmsend offers a lossless file's syntax plus the uncompressed ones in one context (a lossy
    # one alone); Pleura keeps compressed encodings as sent and prefers explicit over implicit VR.
    stored = dcmread(instance.spool_path)
    assert instance.transfer_syntax_uid == (ExplicitVRLittleEndian if syntax == ImplicitVRLittleEndian else syntax)
    assert stored.file_meta.TransferSyntaxUID == instance.transfer_syntax_uid
    assert _close(decode(stored), expected)


def _close(pixels: np.ndarray, expected: np.ndarray) -> bool:
    assert pixels.shape == expected.shape and pixels.dtype == np.float32
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    return bool(np.corrcoef(pixels.ravel(), expected.ravel())[0, 1] > 0.99)


def test_jpeg_ls_goes_through_the_fastest_decoder_with_the_same_values(source: tuple[Path, np.ndarray],
                                                                       tmp_path: Path) -> None:
    encoded = tmp_path / "jpegls.dcm"
    subprocess.run([require_tool("dcmcjpls"), str(source[0]), str(encoded)], check=True, timeout=120)
    plugin = FASTEST_PLUGIN[JPEGLSLossless]
    assert plugin in get_decoder(JPEGLSLossless).available_plugins  # installed: the preference takes effect
    ours = _pixel_data(dcmread(encoded))
    assert np.array_equal(ours, pixel_array(dcmread(encoded), decoding_plugin="pylibjpeg"))
    assert np.array_equal(ours, dcmread(source[0]).pixel_array)  # lossless
