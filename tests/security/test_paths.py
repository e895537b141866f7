"""Issue 5 item 11: peer-supplied strings never become paths outside the spool."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.spool import InvalidUID, Spool, SpoolWrite, check_uid
from tests.figures import save
from tests.security.make_corpus import base_dataset, encode_body, find, part10, set_value
from tests.security.test_malformed import Listener, listener, send_file  # noqa: F401

GOOD = "1.2.826.0.1.3680043.10.1"
HOSTILE = [
    "", ".", "..", "../x", "../../etc/passwd", "/etc/passwd", "/tmp/x", "1.2.3/../../x", "1.2.3/..",
    "1.2\x003", "1.2.3\x00", "1.2.3\n", "1.2.3 ", " 1.2.3", "1.2.3\\..\\x", "1\uff0e2\uff0e3", "\u0661.\u0662",
    "1.2.3\u2024", "１.２", "1." * 40 + "1", "9" * 65, "1..2", "1.2.", ".1.2", "01.2", "1.02", "~", "$HOME", "1;2",
]


def _receive(spool: Spool, study_uid: str, sop_uid: str, data: bytes) -> SpoolWrite:
    """As the listener does: the bytes into a temporary file as they arrive, then filed under the UIDs."""
    incoming = spool.incoming()
    incoming.write(data)
    return spool.place(incoming, study_uid, sop_uid)


@pytest.mark.parametrize("value", HOSTILE, ids=[repr(v)[:30] for v in HOSTILE])
def test_hostile_uid_is_refused_and_writes_nothing(value: str, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    with pytest.raises(InvalidUID) as caught:
        check_uid(value)
    assert value not in str(caught.value) or value == ""  # the peer's string is not echoed
    for study, sop in ((value, GOOD), (GOOD, value)):
        with pytest.raises(InvalidUID):
            _receive(spool, study, sop, b"DICM")
    assert set(tmp_path.rglob("*")) <= {spool.root, spool.incoming_dir} and not any(spool.incoming_dir.iterdir())


def test_valid_uids_stay_inside_the_spool(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    written = _receive(spool, "1.2.3", "0.4.5", b"x")
    assert written.path.resolve().is_relative_to(spool.root.resolve())
    assert check_uid("1." * 31 + "12") and len("1." * 31 + "12") == 64


@pytest.mark.integration
@pytest.mark.parametrize("tag", [0x0020000D, 0x0020000E], ids=["study", "series"])
def test_cstore_with_a_path_for_a_uid_is_refused(listener: Listener, tmp_path: Path, tag: int) -> None:  # noqa: F811
    """End to end: the listener answers 0xC000 and nothing lands anywhere on the filesystem."""
    outside = tmp_path / "x"
    before = {p for p in tmp_path.rglob("*")}
    ds = base_dataset("paths")
    refused = []
    for value in (f"1.2.3/../../{outside.name}", str(outside), "../../x", "1.2\x003"):
        body = encode_body(ds)
        body = set_value(body, find(body, tag), value.encode() + b"\0" * (len(value) % 2))
        path = tmp_path / "in.dcm"
        path.write_bytes(part10(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, body))
        status, up = send_file(listener.port, path)
        path.unlink()
        refused.append(status)
        if tag == 0x0020000D:
            assert status == 0xC000 and up, value
    spooled = [p for p in listener.spool.rglob("*") if p.is_file()]
    after = {p for p in tmp_path.rglob("*")}
    assert not outside.exists()
    if tag == 0x0020000D:
        assert spooled == [] and after - before == set()
    else:  # the series UID is only recorded, never a path: accepted instances stay inside the spool
        assert all(p.resolve().is_relative_to(listener.spool.resolve()) for p in spooled)
        assert {p for p in after - before if not p.is_relative_to(listener.spool)} == set()
    save(f"security-paths-cstore-{'study' if tag == 0x0020000D else 'series'}",
         {"hostile_uids_sent": len(refused), "refused_0xC000": refused.count(0xC000),
          "files_outside_spool": 0, "hostile_uids_unit_tested": len(HOSTILE)})
