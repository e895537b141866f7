"""Issue 19: final reports in from the RIS, over HL7 v2 MLLP and FHIR R4, matched to their studies.

Real peers: the ``hl7`` library's MLLP client and ``urllib`` send to a real ``pleura listen`` (PostgreSQL,
RabbitMQ) or ``pleura serve``; a study arrives over DICOM from pynetdicom with its Accession Number.
Every FHIR resource sent is valid for fhir.resources (R4B), every ACK for hl7apy's strict validation.
The labeler is :class:`KeywordLabeler` (``PLEURA_REPORT_LABELER``), except with ``serve``: the default.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hl7
import pytest
from hl7.client import MLLPClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage as CRImageStorage
from sqlalchemy import select

from dicom_node.tls import client_context, server_context
from tests.e2e.harness import Proc, embedded_env, pleura, pleura_run, running, wait_port
from tests.reliability.services import pleura_env
from tests.ris import TOKEN, diagnostic_report, msa, oru, post_fhir, send_hl7
from tests.security.pki import authority
from tests.support import ROOT, free_port, wait_for
from worker.ledger import Event, Report
from worker.ledger.accession import accession_key
from worker.ledger.db import Ledger, upgrade
from worker.reports.labeler import load
from worker.reports.labels import current_labels
from worker.reports.mllp import ReportListener, Senders
from worker.reports.store import Intake

pytestmark = pytest.mark.integration

MAX_KB, TIMEOUT = 16, 1.5


class KeywordLabeler:
    """A tiny labeler: ``no <finding>`` absent, ``<finding>`` present, else not mentioned."""

    name = "test-keywords/1"

    def label(self, text: str, findings: Sequence[str]) -> dict[str, str | None]:
        low = text.lower()
        return {f: "absent" if f"no {f.lower()}" in low else "present" if f.lower() in low else None
                for f in findings}


def send_study(port: int, accession: str, uid: str | None = None) -> str:
    """One CR image with ``accession`` (in study ``uid``, or a new one) from pynetdicom; its Study Instance UID."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid or generate_uid(), generate_uid()
    ds.Modality, ds.AccessionNumber, ds.PatientName, ds.PatientID = "CR", accession, "TEST^REPORTS", "RPT-0001"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(128)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    return str(ds.StudyInstanceUID)


@contextmanager
def listener(tmp_path: Path, pg_url: str, amqp_url: str) -> Iterator[tuple[dict[str, int], Ledger, Proc]]:
    """A ``pleura listen`` taking reports over MLLP and FHIR; studies are received, never queued."""
    ports = {"dicom": free_port(), "hl7": free_port(), "http": free_port()}
    token = tmp_path / "reports-token"
    token.write_text(TOKEN + "\n")
    env = {**pleura_env(tmp_path, pg_url, amqp_url, ports["dicom"], "", study_quiet_seconds=3600,
                        study_settle_seconds=-1, prepare_on_arrival="false", hl7_port=ports["hl7"],
                        http_port=ports["http"], reports_token_file=token, hl7_max_message_kb=MAX_KB,
                        hl7_timeout_seconds=TIMEOUT, hl7_allowed_senders="RIS,EPIC@10.11.12.13",
                        report_labeler="tests.worker.reports.test_intake:KeywordLabeler"),
           "PYTHONPATH": str(ROOT)}
    pleura_run(env, "db", "upgrade")
    proc = pleura("listen", env, tmp_path / "listen.log")
    ledger = Ledger(pg_url)
    try:
        with running(proc):
            for port in ports.values():
                wait_port(port, proc)
            yield ports, ledger, proc
    finally:
        ledger.close()


def reports(ledger: Ledger) -> list[Report]:
    with ledger.session() as s:
        return list(s.scalars(select(Report).order_by(Report.id)))


def events(ledger: Ledger, kind: str) -> list[dict[str, Any]]:
    with ledger.session() as s:
        return [{"study_id": e.study_id, **json.loads(e.detail or "{}")}
                for e in s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id))]


def test_reports_are_stored_matched_and_superseded(pg_url: str, amqp_url: str, tmp_path: Path) -> None:
    with listener(tmp_path, pg_url, amqp_url) as (ports, ledger, proc):
        # a final report over HL7 for a study that arrived before: matched at once, labelled
        send_study(ports["dicom"], "ACSN-7731-A")
        report_a = oru("RPT-A-1", accession="ACSN-7731-A", text="Small Effusion.\nNo Pneumothorax.")
        assert msa(send_hl7(ports["hl7"], report_a)) == ("AA", "RPT-A-1", "")
        # an identical resend: acknowledged, not stored twice
        assert msa(send_hl7(ports["hl7"], report_a)) == ("AA", "RPT-A-1", "")
        [a] = reports(ledger)
        assert (a.source, a.status, a.message_id, a.labeler) == ("hl7", "final", "RPT-A-1", "test-keywords/1")
        assert a.study_id is not None and a.matched_at is not None and a.sender == "RIS@127.0.0.1"
        labels_a = json.loads(a.labels)
        assert labels_a["Effusion"] == "present" and labels_a["Pneumothorax"] == "absent"
        assert labels_a["Cardiomegaly"] is None and {"Hernia", "Abnormal", "Pleural_Thickening"} <= set(labels_a)
        assert a.study_instance_uid is None and a.accession_sha256 == accession_key("ACSN-7731-A")

        # study B: a preliminary over HL7 (by study UID) and a final over FHIR (by accession) arrive first
        uid_b = generate_uid()
        prelim = oru("RPT-B-1", uid=uid_b, status="P", text="Possible Cardiomegaly.")
        assert msa(send_hl7(ports["hl7"], prelim))[0] == "AA"
        status, headers, body = post_fhir(ports["http"], diagnostic_report(
            accession="ACSN-7731-B", text="FINDINGS: Cardiomegaly. No Effusion.", rid="dr-b"))
        assert status == 201 and headers["Location"].startswith("/fhir/DiagnosticReport/"), body
        assert body["resourceType"] == "OperationOutcome" and "waiting for its study" in body["issue"][0]["diagnostics"]
        assert all(r.study_id is None for r in reports(ledger)[1:]), "no study yet: the reports wait"
        # then the study, with the UID and accession the RIS gave
        send_study(ports["dicom"], "ACSN-7731-B", uid_b)
        wait_for(lambda: all(r.study_id is not None for r in reports(ledger)), 15, "the sweeper to match B's reports")
        prelim_row, final_row = reports(ledger)[1:]
        assert prelim_row.study_id == final_row.study_id and prelim_row.superseded_at is not None
        assert final_row.superseded_at is None and final_row.source == "fhir"

        # a correction (FHIR amended, the same resource id) supersedes the final; its resend is a 200
        corrected = diagnostic_report("amended", accession="ACSN-7731-B", rid="dr-b",
                                      conclusion="Corrected: no Cardiomegaly. Effusion.")
        status, headers, body = post_fhir(ports["http"], corrected)
        assert status == 201 and "matched to its study" in body["issue"][0]["diagnostics"]
        again, again_headers, _ = post_fhir(ports["http"], corrected, content_type="application/json")
        assert again == 200 and again_headers["Location"] == headers["Location"]
        rows = reports(ledger)
        assert len(rows) == 4 and [r.superseded_at is None for r in rows] == [True, False, False, True]
        assert rows[3].status == "corrected" and rows[3].study_id == final_row.study_id
        with ledger.session() as s:
            current = current_labels(s)
        assert current[final_row.study_id]["Cardiomegaly"] == "absent"
        assert current[final_row.study_id]["Effusion"] == "present"
        assert current[a.study_id]["Effusion"] == "present"

        # the trail: received, matched (at once or by the sweeper), resent; ids and codes only
        assert len(events(ledger, "report_received")) == 4
        matched = events(ledger, "report_matched")
        assert {m["by"] for m in matched} == {"accession", "study_instance_uid"}
        assert matched[-1]["superseded"] == [final_row.id]
        assert [e["source"] for e in events(ledger, "report_resent")] == ["hl7", "fhir"]
        trail = proc.log.read_text() + json.dumps([events(ledger, k) for k in ("report_received", "report_matched")])
        for secret in ("ACSN-7731", "Cardiomegaly.", "Small Effusion", "TEST^REPORTS", "RPT-0001"):
            assert secret not in trail


def test_bad_reports_get_a_clean_nack_and_nothing_is_stored(pg_url: str, amqp_url: str, tmp_path: Path) -> None:
    with listener(tmp_path, pg_url, amqp_url) as (ports, ledger, proc):
        port, http = ports["hl7"], ports["http"]
        nacks = {
            "no OBR": "MSH|^~\\&|RIS|HOSPITAL|PLEURA|PLEURA|20261203101500||ORU^R01^ORU_R01|BAD-1|P|2.5.1\rPID|1\r",
            "wrong type": oru("BAD-2", accession="ACSN-9", kind="ADT^A08^ADT_A01"),
            "no accession, no UID": oru("BAD-3"),
            "no text": oru("BAD-4", accession="ACSN-9", text=""),
            "unknown status": oru("BAD-5", accession="ACSN-9", status="X"),
            "not a UID": oru("BAD-6", uid="1.2.x.4"),
        }
        for what, message in nacks.items():
            code, control_id, reason = msa(send_hl7(port, message))
            assert (code, control_id) == ("AE", f"BAD-{list(nacks).index(what) + 1}"), (what, reason)
            assert reason, f"{what}: MSA-3 says why"
        # senders: an application not on the allow-list, one allowed only from another host
        for app in ("INTRUDER", "EPIC"):
            code, _, reason = msa(send_hl7(port, oru(f"AR-{app}", app=app, accession="ACSN-9")))
            assert code == "AR" and app in reason
        # not HL7 at all: closed without an answer
        assert send_hl7(port, "hello, is this the RIS?") is None
        # an oversized message: AE, then the connection is closed
        with MLLPClient("127.0.0.1", port) as client:
            client.socket.settimeout(10)
            big = oru("BIG-1", accession="ACSN-9", text="Effusion. " * (MAX_KB * 120))
            answer = client.send_message(big)
            assert msa(hl7.parse(answer.decode().strip("\x0b\x1c\r")))[:2] == ("AE", "BIG-1")
            assert wait_for(lambda: client.socket.recv(1) == b"", 10, "the connection to close")
        # a sender that stalls mid-message is disconnected after PLEURA_HL7_TIMEOUT_SECONDS
        with socket.create_connection(("127.0.0.1", port), timeout=60) as stalled:
            stalled.sendall(b"\x0b" + oru("SLOW-1", accession="ACSN-9").encode()[:60])
            began = time.monotonic()
            assert stalled.recv(100) == b""
            # not before the timeout; after it, as soon as a loaded host gets to it (the reason is checked below)
            assert TIMEOUT - 0.2 < time.monotonic() - began < TIMEOUT + 30
        # the same MSH-10 again with other content: AE, the first one kept as it was
        assert msa(send_hl7(port, oru("DUP-1", accession="ACSN-9", text="Effusion.")))[0] == "AA"
        code, _, reason = msa(send_hl7(port, oru("DUP-1", accession="ACSN-9", text="No Effusion.")))
        assert code == "AE" and "other content" in reason

        # FHIR: the token, the media type, the resource, what it says, the size
        good = diagnostic_report(accession="ACSN-9", conclusion="Effusion.")
        answers = {
            "wrong token": post_fhir(http, good, token="guess"),
            "no token": post_fhir(http, good, token=None),
            "not JSON": post_fhir(http, b"{not json"),
            "not a DiagnosticReport": post_fhir(http, {"resourceType": "Observation", "status": "final",
                                                       "code": {"text": "x"}}),
            "XML": post_fhir(http, b"<DiagnosticReport/>", content_type="application/fhir+xml"),
            "no accession, no UID": post_fhir(http, diagnostic_report(conclusion="Effusion.")),
            "no text": post_fhir(http, diagnostic_report(accession="ACSN-9")),
            "unknown status": post_fhir(http, diagnostic_report("registered", accession="ACSN-9", conclusion="x")),
            "not base64": post_fhir(http, {**good, "presentedForm": [{"contentType": "text/plain", "data": "!!"}]}),
            "too large": post_fhir(http, diagnostic_report(accession="ACSN-9", text="x" * (MAX_KB * 1024 + 1))),
        }
        statuses = {what: status for what, (status, _, _) in answers.items()}
        assert statuses == {"wrong token": 401, "no token": 401, "not JSON": 400, "not a DiagnosticReport": 400,
                            "XML": 415, "no accession, no UID": 422, "no text": 422, "unknown status": 422,
                            "not base64": 422, "too large": 413}
        for what, (_, headers, body) in answers.items():
            assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["severity"] == "error", what
            assert headers["Content-Type"].startswith("application/fhir+json")
        assert answers["wrong token"][1]["WWW-Authenticate"] == "Bearer"

        # one stored report (DUP-1); every refusal an event with its reason, no report text, no accession
        assert [r.message_id for r in reports(ledger)] == ["DUP-1"]
        refused = events(ledger, "report_refused")
        hl7_refused = [e for e in refused if e["source"] == "hl7"]
        assert len(hl7_refused) == len(nacks) + 2 + 3 + 1  # AE, AR, not HL7 / oversized / stalled, DUP-1
        assert {e["message_id"] for e in hl7_refused} >= {f"BAD-{n}" for n in range(1, 7)} | {"BIG-1", "AR-EPIC"}
        assert any("not complete within" in e["reason"] for e in hl7_refused)
        assert sorted(e["http_status"] for e in refused if e["source"] == "fhir") == sorted(statuses.values())
        trail = json.dumps(refused) + proc.log.read_text()
        assert "ACSN-9" not in trail and "Effusion." not in trail and "TEST^REPORTS" not in trail


def test_serve_takes_hl7_reports_with_the_default_labeler_fhir_off(tmp_path: Path) -> None:
    port, hl7_port, http = free_port(), free_port(), free_port()
    env = {**embedded_env(tmp_path, port, free_port(), quiet=3600), "PLEURA_HL7_PORT": str(hl7_port),
           "PLEURA_HTTP_PORT": str(http), "PLEURA_SWEEP_INTERVAL_SECONDS": "0.25"}
    env.pop("PLEURA_DESTINATIONS")
    serve = pleura("serve", env, tmp_path / "serve.log")
    with running(serve):
        for p in (hl7_port, http):
            wait_port(p, serve, timeout=120)
        assert msa(send_hl7(hl7_port, oru("S-1", accession="ACSN-S", text="Small left pleural effusion.")))[0] == "AA"
        status, _, body = post_fhir(http, diagnostic_report(accession="ACSN-S", conclusion="Effusion."))
        assert status == 404 and "FHIR reports are off" in body["issue"][0]["diagnostics"]
        send_study(port, "ACSN-S")
        ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'pleura.db'}")
        try:
            [row] = wait_for(lambda: [r for r in reports(ledger) if r.study_id is not None], 15, "the match")
        finally:
            ledger.close()
    assert row.labeler == load(None).name and set(json.loads(row.labels)) >= {"Effusion", "Hernia", "Abnormal"}


def test_mllp_over_tls_admits_only_certified_senders(tmp_path: Path) -> None:
    trusted, rogue = authority(tmp_path / "pki", "trusted"), authority(tmp_path / "pki", "rogue")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    ledger = Ledger(url)
    tls = server_context(trusted.server.cert, trusted.server.key, trusted.ca.cert, require_peer_cert=True)
    server = ReportListener(Intake(ledger, KeywordLabeler(), ("Effusion",)), "127.0.0.1", 0, Senders([]),
                            MAX_KB * 1024, TIMEOUT, tls).start()

    def exchange(ctx: ssl.SSLContext) -> bytes:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"\x0b" + oru("TLS-1", accession="ACSN-T").encode() + b"\x1c\r")
                return sock.recv(4096)

    try:
        certified = client_context(trusted.ca.cert, trusted.client.cert, trusted.client.key)
        assert msa(hl7.parse(exchange(certified).decode().strip("\x0b\x1c\r")))[:2] == ("AA", "TLS-1")
        for stranger in (client_context(trusted.ca.cert), client_context(trusted.ca.cert, rogue.client.cert,
                                                                         rogue.client.key)):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                exchange(stranger)
        assert msa(hl7.parse(exchange(certified).decode().strip("\x0b\x1c\r")))[0] == "AA", "still serving"
        assert len(reports(ledger)) == 1
        assert sum("TLS handshake failed" in e["reason"] for e in events(ledger, "report_refused")) == 2
    finally:
        server.stop()
        ledger.close()
