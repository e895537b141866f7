"""A deflate bomb over C-STORE: refused with 0xC000 within a bounded memory, the listener unharmed.

The bomb is a real Deflated Explicit VR Little Endian Part-10 file (a CR header and 1 GiB of zero
pixel data, deflated to about 1 MB), written in pieces so that this test stays small in memory.
`pleura serve` runs with ``PLEURA_MAX_INFLATED_MB=64``; its peak memory (VmHWM) is read before
and after the bomb. The unit tests of :mod:`dicom_node.deflate` come first.
"""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import _config
from sqlalchemy import select

from dicom_node.deflate import InflateError, inflated_size
from tests.e2e.harness import pleura, running, wait_port
from tests.figures import save
from tests.security.make_corpus import base_dataset, encode_body, part10
from tests.security.test_malformed import leftovers, send_file
from tests.support import free_port
from worker.ledger import Event, Instance
from worker.ledger.db import Ledger

MiB = 2**20
LIMIT_MB = 64
BOMB_ROWS, BOMB_COLUMNS = 16384, 32768  # 16-bit: 1 GiB of pixel data
MAX_GROWTH_MB = 256
REASON = f"deflated data set inflates beyond the limit of {LIMIT_MB} MiB"


def _raw_deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def _deflated_part10(body: bytes, name: str = "deflate-unit") -> bytes:
    ds = base_dataset(name)
    return part10(ds.SOPClassUID, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian, body)


def _zeros_bomb(inflated: int) -> bytes:
    """``inflated`` zero bytes, raw-deflated a MiB at a time."""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(MiB)
    pieces = [deflater.compress(chunk) for _ in range(inflated // MiB)]
    return b"".join(pieces) + deflater.flush()


def test_within_the_limit_gives_the_inflated_size() -> None:
    body = encode_body(base_dataset("deflate-unit"))
    assert inflated_size(_deflated_part10(_raw_deflate(body)), len(body)) == len(body)


def test_beyond_the_limit_is_refused_in_bounded_memory() -> None:
    bomb = _deflated_part10(_zeros_bomb(64 * MiB))  # 64 KB
    tracemalloc.start()
    try:
        with pytest.raises(InflateError, match="inflates beyond the limit of 16 MiB"):
            inflated_size(bomb, 16 * MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"{peak / MiB:.1f} MiB traced while inflating"


@pytest.mark.parametrize(("body", "what"), [
    (b"\xff" * 64, "corrupt"),
    (_raw_deflate(encode_body(base_dataset("deflate-unit")))[:100], "truncated"),
    (b"", "truncated"),
])
def test_a_broken_stream_is_refused(body: bytes, what: str) -> None:
    with pytest.raises(InflateError, match=what):
        inflated_size(_deflated_part10(body), 64 * MiB)


def test_a_data_set_that_is_not_deflated_is_left_alone() -> None:
    ds = base_dataset("deflate-unit")
    plain = part10(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, encode_body(ds))
    assert inflated_size(plain, 1) is None


def write_bomb(path: Path, rows: int = BOMB_ROWS, columns: int = BOMB_COLUMNS) -> tuple[str, int]:
    """A deflated CR whose 16-bit zero pixel data inflate to ``rows * columns * 2`` bytes, streamed
    to ``path`` a MiB at a time: (SOP Instance UID, inflated size of the body)."""
    ds = base_dataset("deflate-bomb")
    ds.Rows, ds.Columns = rows, columns
    del ds.PixelData
    pixels = rows * columns * 2
    header = encode_body(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixels)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(MiB)
    with path.open("wb") as fh:
        fh.write(part10(ds.SOPClassUID, ds.SOPInstanceUID, DeflatedExplicitVRLittleEndian, b""))
        fh.write(deflater.compress(header))
        for start in range(0, pixels, MiB):
            fh.write(deflater.compress(zeros[:min(MiB, pixels - start)]))
        fh.write(deflater.flush())
    return str(ds.SOPInstanceUID), len(header) + pixels


def write_valid(path: Path) -> str:
    """A small, valid CR saved by pydicom with Deflated Explicit VR Little Endian."""
    ds = base_dataset("deflate-valid")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def peak_memory_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def reset_peak_memory(pid: int) -> None:
    """VmHWM back to the current resident set (Linux clear_refs 5), so that growth is the bomb's."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def refusals(db: Path) -> list[dict]:
    ledger = Ledger(f"sqlite:///{db}")
    try:
        with ledger.session() as s:
            events = s.scalars(select(Event).where(Event.kind == "instance_refused").order_by(Event.id)).all()
            return [json.loads(e.detail or "{}") for e in events]
    finally:
        ledger.close()


def stored_uids(db: Path) -> list[str]:
    ledger = Ledger(f"sqlite:///{db}")
    try:
        with ledger.session() as s:
            return list(s.scalars(select(Instance.sop_instance_uid)).all())
    finally:
        ledger.close()


@pytest.mark.slow
def test_deflate_bomb_is_refused_and_the_listener_keeps_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the file's bytes, never decoded here
    started = time.monotonic()
    bomb = tmp_path / "bomb.dcm"
    bomb_uid, inflated = write_bomb(bomb)
    generated_s = time.monotonic() - started
    valid = tmp_path / "valid.dcm"
    valid_uid = write_valid(valid)
    port, var = free_port(), tmp_path / "var"
    env = {"PLEURA_DATA_DIR": str(var), "PLEURA_DICOM_PORT": str(port), "PLEURA_MIN_FREE_DISK_MB": "20",
           "PLEURA_MAX_INFLATED_MB": str(LIMIT_MB)}
    serve = pleura("serve", env, tmp_path / "serve.log")
    with running(serve):
        wait_port(port, serve, timeout=120)
        pid = serve.popen.pid
        reset_peak_memory(pid)
        before_mb = peak_memory_mb(pid)
        sent = time.monotonic()
        status, still_up = send_file(port, bomb)
        refused_s = time.monotonic() - sent
        after_mb = peak_memory_mb(pid)

        assert status == 0xC000 and still_up
        refusal = [r for r in refusals(var / "pleura.db") if r["sop_instance_uid"] == bomb_uid]
        assert len(refusal) == 1 and refusal[0]["status"] == "0xC000", refusal
        assert refusal[0]["reason"] == f"cannot understand: {REASON}"
        assert bomb_uid not in stored_uids(var / "pleura.db")
        assert not list((var / "spool").rglob(f"{bomb_uid}*")) and leftovers(var / "spool") == []
        growth_mb = after_mb - before_mb
        assert growth_mb < MAX_GROWTH_MB, f"the listener grew by {growth_mb:.0f} MiB for {inflated / MiB:.0f} MiB"

        assert serve.alive()
        assert send_file(port, valid) == (0, True)
        assert valid_uid in stored_uids(var / "pleura.db")
    save("deflate_bomb", {
        "bomb_compressed_bytes": bomb.stat().st_size,
        "bomb_inflated_bytes": inflated,
        "limit_mb": LIMIT_MB,
        "status": f"0x{status:04X}",
        "reason": refusal[0]["reason"],
        "listener_peak_before_mb": round(before_mb, 1),
        "listener_peak_after_mb": round(after_mb, 1),
        "listener_peak_growth_mb": round(growth_mb, 1),
        "bomb_generation_s": round(generated_s, 2),
        "refusal_s": round(refused_s, 2),
        "valid_deflated_status": "0x0000",
        "test_s": round(time.monotonic() - started, 1),
    })
