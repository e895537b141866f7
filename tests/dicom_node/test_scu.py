"""The C-STORE SCU reads files one at a time, just before each is sent, and reports one it cannot read."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

import dicom_node.scu
from dicom_node.scu import iter_send_files, send_files
from tests.security.make_corpus import base_dataset
from tests.support import free_port


def write_instance(path: Path, name: str) -> Dataset:
    """A small CR, as a DICOM file with a File Meta header."""
    ds = base_dataset(name)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture
def peer() -> Iterator[tuple[int, list[Callable[[], None]]]]:
    """A C-STORE peer that stores everything; each callable in the list runs at every C-STORE it gets."""
    on_store: list[Callable[[], None]] = []

    def handle(_event: evt.Event) -> int:
        for call in on_store:
            call()
        return 0x0000

    ae = AE(ae_title="PEER")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    yield port, on_store
    server.shutdown()


def test_files_are_read_one_at_a_time_just_before_each_is_sent(peer: tuple[int, list[Callable[[], None]]],
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    port, on_store = peer
    paths = [tmp_path / f"{n}.dcm" for n in range(4)]
    for n, path in enumerate(paths):
        write_instance(path, f"lazy-{n}")
    alive: list[weakref.ref] = []

    def counted_dcmread(path: Path, **kwargs: object) -> Dataset:
        ds = dcmread(path, **kwargs)
        if not kwargs.get("stop_before_pixels"):  # a whole data set, pixels included
            alive.append(weakref.ref(ds))
        return ds

    held: list[int] = []
    monkeypatch.setattr(dicom_node.scu, "dcmread", counted_dcmread)
    on_store.append(lambda: held.append(sum(r() is not None for r in alive)))
    on_store.append(lambda: paths[2].unlink(missing_ok=True))  # gone after the headers were read
    results = send_files("127.0.0.1", port, paths, called_ae="PEER")
    assert [(r.name, r.status) for r in results] == [(str(p), s) for p, s in zip(paths, [0, 0, None, 0], strict=True)]
    assert results[2].error == "unreadable: No such file or directory"
    assert held == [1, 1, 1]  # the data set being sent, no other


def test_unreadable_files_are_reported_and_the_others_sent(peer: tuple[int, list[Callable[[], None]]],
                                                           tmp_path: Path) -> None:
    port, _ = peer
    good = write_instance(tmp_path / "a.dcm", "good")
    (tmp_path / "b.txt").write_text("not DICOM")
    results = list(iter_send_files("127.0.0.1", port, [tmp_path / "a.dcm", tmp_path / "b.txt"], called_ae="PEER"))
    assert [(r.sop_instance_uid, r.status, r.error) for r in results] == [
        (good.SOPInstanceUID, 0x0000, None), ("", None, "unreadable: not a DICOM file with a File Meta header")]
    only_bad = list(iter_send_files("127.0.0.1", port, [tmp_path / "b.txt"], called_ae="PEER"))
    assert [(r.status, r.error) for r in only_bad] == [(None, "unreadable: not a DICOM file with a File Meta header")]
