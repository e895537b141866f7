"""Studies in by STOW-RS (worker.listen.dicomweb over dicom_node.stow), served by uvicorn on a real
port, recorded by the ledger's receiver: a client nobody here wrote (dicomweb-client), then every
kind of bad input with the status it gets and what the ledger kept."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from dicom_node.spool import Spool
from tests.security.make_corpus import base_dataset, encode_body, part10
from tests.security.pki import authority
from tests.support import wait_for
from worker.ledger import Association, Event, Instance
from worker.ledger.db import Ledger, upgrade
from worker.listen import dicomweb
from worker.listen.receiver import LedgerReceiver
from worker.settings import Settings
from worker.web.server import HttpEndpoints

TOKEN = "s3cret-token"
MAX_BYTES = 3_000_000


@dataclass
class Stow:
    url: str
    port: int
    ledger: Ledger
    spool: Spool
    server: HttpEndpoints
    receiver: LedgerReceiver

    def post(self, body: bytes, content_type: str, token: str | None = TOKEN, path: str = "/dicom-web/studies",
             **kwargs: object) -> requests.Response:
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return requests.post(f"http://127.0.0.1:{self.port}{path}", data=body, headers=headers, timeout=30,
                             **kwargs)  # type: ignore[arg-type]

    def instances(self) -> list[Instance]:
        with self.ledger.session() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def associations(self) -> list[Association]:
        with self.ledger.session() as s:
            return list(s.scalars(select(Association).order_by(Association.id)))


@contextmanager
def _serving(tmp_path: Path, receiver: Callable[[Ledger], LedgerReceiver] = LedgerReceiver,
             **settings: Any) -> Iterator[Stow]:
    """STOW-RS on a SQLite ledger and a spool under ``tmp_path``, tokens ``PACS-A`` and an unnamed one;
    ``settings`` override the defaults."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    ledger = Ledger(url)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# STOW-RS clients\nPACS-A:{TOKEN}\n\nanonymous-token\n")
    spool, recording = Spool(tmp_path / "spool"), receiver(ledger)
    server = dicomweb.start(Settings(**{"data_dir": tmp_path / "data", "dicomweb_port": 0,
                                        "dicomweb_host": "127.0.0.1", "dicomweb_token_file": tokens, **settings}),
                            spool, recording)
    try:
        yield Stow(f"http://127.0.0.1:{server.port}/dicom-web", server.port, ledger, spool, server, recording)
    finally:
        server.stop()
        ledger.close()


@pytest.fixture
def stow(tmp_path: Path) -> Iterator[Stow]:
    with _serving(tmp_path, dicomweb_max_mb=MAX_BYTES // 1_000_000, dicomweb_timeout_seconds=2) as serving:
        yield serving


def _part10(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _instance(name: str, study: str | None = None) -> Dataset:
    ds = base_dataset(name)
    ds.SOPInstanceUID = generate_uid()
    if study is not None:
        ds.StudyInstanceUID = study
    return ds


def _multipart(*parts: bytes | tuple[str, bytes], boundary: str = "b0und4ry") -> bytes:
    out = b""
    for part in parts:
        kind, data = part if isinstance(part, tuple) else ("application/dicom", part)
        out += f"--{boundary}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


RELATED = 'multipart/related; type="application/dicom"; boundary=b0und4ry'


def test_a_client_nobody_here_wrote_stores_a_real_chest_film(stow: Stow, real_cr: Path) -> None:
    client = DICOMwebClient(stow.url, headers={"Authorization": f"Bearer {TOKEN}"})
    film = dcmread(real_cr)
    answer = client.store_instances([film])
    assert answer.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == film.SOPInstanceUID
    assert "FailedSOPSequence" not in answer
    (kept,) = stow.instances()
    assert (kept.sop_instance_uid, kept.transfer_syntax_uid) == (film.SOPInstanceUID,
                                                                 film.file_meta.TransferSyntaxUID)
    assert dcmread(kept.spool_path).SOPInstanceUID == film.SOPInstanceUID  # the part as sent, filed
    # the request is an association of the token's sender, released once answered (the completion rule)
    wait_for(lambda: stow.associations()[0].end_reason == "released", 5, "the request's end to be recorded")
    (assoc,) = stow.associations()
    assert (assoc.calling_ae, assoc.called_ae, assoc.peer_host) == ("PACS-A", "STOW-RS", "127.0.0.1")


def test_several_parts_to_a_study_unquoted_boundary_and_chunked(stow: Stow) -> None:
    study = generate_uid()
    first, second = _instance("one", study), _instance("two", study)
    body = _multipart(_part10(first), _part10(second), boundary="plain")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for start in range(0, len(body), 7000):
            yield body[start:start + 7000]

    answer = stow.post(chunks(), "multipart/related; type=application/dicom; boundary=plain",  # type: ignore[arg-type]
                       token="anonymous-token", path=f"/dicom-web/studies/{study}")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    referenced = json.loads(answer.content)["00081199"]["Value"]
    assert [r["00081155"]["Value"][0] for r in referenced] == [first.SOPInstanceUID, second.SOPInstanceUID]
    assert [i.sop_instance_uid for i in stow.instances()] == [first.SOPInstanceUID, second.SOPInstanceUID]
    wait_for(lambda: stow.associations()[0].end_reason == "released", 5, "the request's end to be recorded")
    assert stow.associations()[0].calling_ae == "DICOMWEB"  # a token without a name


def _failed(answer: requests.Response) -> list[tuple[str, int]]:
    body = json.loads(answer.content)
    return [(f.get("00081155", {}).get("Value", [""])[0], f["00081197"]["Value"][0])
            for f in body.get("00081198", {}).get("Value", [])]


def _stalled_request(port: int, body: bytes) -> bytes:
    """Send the headers and half the body, then nothing: what the server answers."""
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {RELATED}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head + body[: len(body) // 2])
        return sock.recv(65536)


def test_bad_input_gets_its_status_and_keeps_every_valid_part(stow: Stow, tmp_path: Path) -> None:
    good = _instance("good")
    valid = _part10(good)
    other_study = _instance("other")
    mpeg2_ds = _instance("mpeg2")
    table: dict[str, tuple[int, requests.Response | bytes]] = {}

    def case(name: str, status: int, answer: requests.Response | bytes) -> None:
        table[name] = (status, answer)

    case("no token", 401, stow.post(_multipart(valid), RELATED, token=None))
    case("wrong token", 401, stow.post(_multipart(valid), RELATED, token="guess"))
    case("not multipart", 415, stow.post(valid, "application/dicom"))
    case("parts of another type", 415, stow.post(_multipart(valid), 'multipart/related; type="image/jpeg"; '
                                                 "boundary=b0und4ry"))
    case("no boundary", 400, stow.post(_multipart(valid), 'multipart/related; type="application/dicom"'))
    case("wrong boundary", 400, stow.post(_multipart(valid, boundary="other"), RELATED))
    case("truncated body", 400, stow.post(_multipart(valid)[:-40], RELATED))
    case("over the limit (Content-Length)", 413, stow.post(b"x" * (MAX_BYTES + 1), RELATED))
    case("study UID not the path's", 409, stow.post(_multipart(_part10(other_study)), RELATED,
                                                     path=f"/dicom-web/studies/{generate_uid()}"))
    case("a part that is not DICOM, one of another type, one valid", 202,
         stow.post(_multipart(b"not dicom at all", ("text/plain", b"hello"), valid), RELATED))
    case("a second identical POST", 200, stow.post(_multipart(valid), RELATED))
    mpeg2 = part10(mpeg2_ds.SOPClassUID, mpeg2_ds.SOPInstanceUID, MPEG2MPML, encode_body(mpeg2_ds))  # not taken
    case("a transfer syntax not taken", 409, stow.post(_multipart(mpeg2), RELATED))
    case("a client that stalls", 408, _stalled_request(stow.port, _multipart(_part10(_instance("stall")))))

    for name, (expected, answer) in table.items():
        got = int(answer.split(b" ", 2)[1]) if isinstance(answer, bytes) else answer.status_code
        assert got == expected, f"{name}: {got} {answer if isinstance(answer, bytes) else answer.text}"
    assert table["wrong token"][1].headers["www-authenticate"].startswith("Bearer")  # type: ignore[union-attr]
    mixed = table["a part that is not DICOM, one of another type, one valid"][1]
    assert sorted(reason for _, reason in _failed(mixed)) == [0xC000, 0xC000]  # type: ignore[arg-type]
    assert json.loads(mixed.content)["00081199"]["Value"][0]["00081155"]["Value"] == [good.SOPInstanceUID]  # type: ignore[union-attr]
    assert _failed(table["study UID not the path's"][1]) == [(other_study.SOPInstanceUID, 0xC409)]  # type: ignore[arg-type]
    assert _failed(table["a transfer syntax not taken"][1]) == [(mpeg2_ds.SOPInstanceUID, 0xC122)]  # type: ignore[arg-type]

    # the ledger kept the valid instance once (the identical resend is the same instance) and nothing else
    assert [(i.sop_instance_uid, i.times_received) for i in stow.instances()] == [(good.SOPInstanceUID, 2)]
    assert sorted(p.name for p in stow.spool.root.rglob("*.dcm")) == [f"{good.SOPInstanceUID}.dcm"]
    assert list(stow.spool.incoming_dir.iterdir()) == []  # no part half-written is left
    with stow.ledger.session() as s:
        refusals = sorted((d["status"], d["sop_instance_uid"]) for d in (
            json.loads(e.detail) for e in s.scalars(select(Event).where(Event.kind == "instance_refused"))))
    assert refusals == sorted([("0xC000", ""), ("0xC000", ""), ("0xC409", other_study.SOPInstanceUID),
                               ("0xC122", mpeg2_ds.SOPInstanceUID)])
    with stow.ledger.session() as s:  # requests refused on their headers: rejected associations, with the reason
        rejected = [json.loads(e.detail) for e in s.scalars(select(Event).where(Event.kind == "association_rejected"))]
    assert sorted(r["reason"].rsplit("(", 1)[1] for r in rejected) == sorted(
        ["HTTP 400)", "HTTP 401)", "HTTP 401)", "HTTP 413)", "HTTP 415)", "HTTP 415)"])
    assert {(r["calling_ae"], r["called_ae"]) for r in rejected} == {("", "STOW-RS"), ("PACS-A", "STOW-RS")}
    # requests refused before their body was read were never associations; the others all ended
    deadline = time.monotonic() + 10
    while any(a.ended_at is None for a in stow.associations()) and time.monotonic() < deadline:
        time.sleep(0.1)
    ends = sorted(a.end_reason or "" for a in stow.associations())
    assert ends.count("released") == 4 and len(ends) == 7, ends
    assert all(e.startswith("aborted") for e in ends if e != "released"), ends


class _LedgerDown(LedgerReceiver):
    def association_opened(self, peer):  # type: ignore[no-untyped-def]
        raise OSError("the ledger's database is down")


def test_a_request_that_cannot_be_recorded_gets_503_and_keeps_nothing(tmp_path: Path) -> None:
    with _serving(tmp_path, _LedgerDown) as stow:
        answer = stow.post(_multipart(_part10(_instance("down"))), RELATED)
        assert answer.status_code == 503 and "could not be recorded" in answer.text
        assert stow.instances() == [] and list(stow.spool.root.rglob("*.dcm")) == []
        assert list(stow.spool.incoming_dir.iterdir()) == []


def test_mutual_tls_admits_a_client_certificate_without_a_token(tmp_path: Path) -> None:
    pki, rogue = authority(tmp_path / "pki", "trusted"), authority(tmp_path / "pki", "rogue")
    with _serving(tmp_path, dicomweb_token_file=None, dicomweb_tls=True, tls_cert_file=pki.server.cert,
                  tls_key_file=pki.server.key, tls_ca_file=pki.ca.cert) as stow:
        stored = _instance("mtls")
        body, where = _multipart(_part10(stored)), f"https://localhost:{stow.port}/dicom-web/studies"
        headers = {"Content-Type": RELATED}
        answer = requests.post(where, data=body, headers=headers, verify=str(pki.ca.cert), timeout=30,
                               cert=(str(pki.client.cert), str(pki.client.key)))
        assert answer.status_code == 200, answer.text
        for cert in (None, (str(rogue.client.cert), str(rogue.client.key))):  # no certificate, another CA's
            with pytest.raises(requests.exceptions.ConnectionError):
                requests.post(where, data=body, headers=headers, verify=str(pki.ca.cert), timeout=30, cert=cert)
        assert [(a.calling_ae, a.called_ae) for a in stow.associations()] == [("TLS-CLIENT", "STOW-RS")]
        assert [i.sop_instance_uid for i in stow.instances()] == [stored.SOPInstanceUID]
        with pytest.raises(SystemExit, match="PLEURA_DICOMWEB_TOKEN_FILE"):  # neither tokens nor mutual TLS
            dicomweb.start(Settings(data_dir=tmp_path / "data", dicomweb_port=0), stow.spool, stow.receiver)


class _Counting(LedgerReceiver):
    """The ledger receiver, noting the size of each batch it records; ``fail`` makes the batches fail."""

    def __init__(self, ledger: Ledger, fail: bool = False) -> None:
        super().__init__(ledger)
        self.batches: list[int] = []
        self.fail = fail

    def instances_stored(self, stored):  # type: ignore[no-untyped-def]
        self.batches.append(len(stored))
        if self.fail:
            raise OSError("the ledger's database is down")
        super().instances_stored(stored)


@pytest.mark.parametrize("fail", [False, True])
def test_the_parts_of_a_request_are_recorded_in_one_transaction(tmp_path: Path, fail: bool) -> None:
    with _serving(tmp_path, lambda ledger: _Counting(ledger, fail)) as stow:
        sent = [_instance(f"batch-{n}") for n in range(3)]
        answer = stow.post(_multipart(*map(_part10, sent)), RELATED)
        assert stow.receiver.batches == [3]  # type: ignore[attr-defined]  # one transaction (and fsync per folder)
        if fail:  # all or none: each part refused for want of resources, none recorded
            assert answer.status_code == 503
            assert sorted(_failed(answer)) == sorted((ds.SOPInstanceUID, 0xA700) for ds in sent)
            assert stow.instances() == []
        else:
            assert answer.status_code == 200
            assert sorted(i.sop_instance_uid for i in stow.instances()) == sorted(ds.SOPInstanceUID for ds in sent)
