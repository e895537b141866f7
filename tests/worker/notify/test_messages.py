"""The RIS messages (worker.notify) as outside libraries read them: hl7apy's strict HL7 v2.5.1
validation and the ``hl7`` parser for the ORU^R01, fhir.resources for the FHIR Bundle; the MLLP
client against peers that answer badly."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import hl7
import pytest
from fhir.resources.R4B.bundle import Bundle as FhirBundle
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException as HL7apyError
from hl7apy.parser import parse_message
from pydantic.v1 import ValidationError

from dicom_node.tls import client_context, server_context
from tests.ris import MllpPeer
from tests.security.pki import authority
from worker import mllp
from worker.notify import fhir
from worker.notify.hl7 import AckError, escape, oru, parse_ack
from worker.notify.result import FindingOutcome, Patient, Procedure, StudyResult, control_id, report_id

STUDY = "1.2.826.0.1.3680043.8.498.12345"


def _result(procedure: Procedure | None = None) -> StudyResult:
    return StudyResult(
        control_id=control_id("1.2.3.4"), report_id=report_id(STUDY, "demo"), revision=2,
        study_instance_uid=STUDY, accession_number="A|12^3", study_datetime="20261203101500",
        procedure=procedure, study_description="CHEST PA & LAT",
        patient=Patient("PID~7", "HOSP&1", "Ménard^Zoë^Q^Dr^III", "19700101", "F"),
        model_name="demo", model_version="0.1.0", result_at=datetime(2026, 12, 3, 1, 2, 3, tzinfo=UTC),
        findings=(FindingOutcome("Cardiomegaly", "8186001", "SCT", "Cardiomegaly", 0.1, 0.6971, False, False),
                  FindingOutcome("Effusion", "60046008", "SCT", "Pleural effusion", 0.8123, 0.17, True, True),
                  FindingOutcome("Abnormal", "263654008", "SCT", "Abnormal", 0.9, 0.4355, True, False)))


def _strict(text: str):  # type: ignore[no-untyped-def]
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate() is True
    return message


def test_oru_passes_hl7apy_strict_validation_and_reads_back_with_the_hl7_library() -> None:
    result = _result(Procedure("36643-5", "LN", "XR Chest 2 Views"))
    data = oru(result, "PLEURA")
    assert data == oru(result, "PLEURA"), "the same result must give the same bytes (a resend is the same message)"
    text = data.decode("utf-8")
    message = _strict(text)
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01" and message.msh.msh_12.to_er7() == "2.5.1"
    assert message.msh.msh_10.to_er7() == result.control_id and len(result.control_id) == 20

    parsed = hl7.parse(text)
    pid = parsed.segment("PID")
    assert [str(pid(5)(0)(i)) for i in range(1, 6)] == ["Ménard", "Zoë", "Q", "III", "Dr"]  # XPN: suffix, prefix
    assert str(pid(3)(0)(1)) == escape("PID~7") and str(pid(7)) == "19700101" and str(pid(8)) == "F"
    obr = parsed.segment("OBR")
    assert str(obr(4)) == "36643-5^XR Chest 2 Views^LN" and str(obr(25)) == "P" and str(obr(18)) == escape("A|12^3")
    obx = parsed.segments("OBX")
    by_code = {str(o(3)(0)(1)): o for o in obx}
    assert str(by_code["110180"](5)) == STUDY
    assert [(str(by_code[c](5)), str(by_code[c](8))) for c in ("8186001", "60046008", "263654008")] == [
        ("0.1000", "N"), ("0.8123", "AA"), ("0.9000", "A")]  # AA only for the triage finding
    assert str(by_code["111001"](5)) == "demo" and str(by_code["111003"](5)) == "0.1.0"
    assert {str(o(11)) for o in obx} == {"P"} and [str(o(1)) for o in obx] == [str(i) for i in range(1, 7)]


@pytest.mark.parametrize(("change", "message"), [
    (lambda text: "\r".join(s for s in text.split("\r") if not s.startswith("OBR")), "OBR"),
    (lambda text: text.replace("|^CHEST PA \\T\\ LAT|", "||"), "OBR_4"),
    (lambda text: text.replace("19700101", "1970-01-01"), "not an HL7 valid date"),
])
def test_the_strict_validator_can_fail(change, message: str) -> None:  # type: ignore[no-untyped-def]
    """A check that cannot fail proves nothing: hl7apy refuses the message without its OBR, without
    OBR-4 (required) or with a birth date that is not an HL7 date. (It does not check table values
    or lengths: docs/hl7.md says what the interface promises there.)"""
    with pytest.raises((HL7apyError, ValueError), match=message):
        _strict(change(oru(_result(), "PLEURA").decode()))


def test_escaping_keeps_delimiters_out_of_the_structure() -> None:
    assert escape("a|b^c&d~e\\f\rg") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f g"
    text = oru(_result(), "PLE|URA").decode()
    assert len(text.split("\r")[0].split("|")) == 18  # MSH-1 .. MSH-18, however the values are spelled


def test_acknowledgments() -> None:
    control = "ABC123"
    assert parse_ack(b"MSH|^~\\&|RIS||PLEURA||20261203||ACK^R01^ACK|9|P|2.5.1\rMSA|AA|ABC123", control).code == "AA"
    ack = parse_ack(b"MSH|^~\\&|RIS|||||ACK|9|P|2.5.1\rMSA|AR|ABC123|Unknown patient\r"
                    b"ERR|||207^Application internal error^HL70357|E||||Order not found\r", control)
    assert ack.code == "AR" and "Unknown patient" in ack.text and "Order not found" in ack.text
    with pytest.raises(AckError, match="not ours"):
        parse_ack(b"MSH|^~\\&|RIS|||||ACK|9|P|2.5.1\rMSA|AA|OTHER", control)
    with pytest.raises(AckError, match="not an HL7 message"):
        parse_ack(b"HTTP/1.1 200 OK", control)
    with pytest.raises(AckError, match="no MSA"):
        parse_ack(b"MSH|^~\\&|RIS|||||ACK|9|P|2.5.1\r", control)


def test_fhir_bundle_validates_with_fhir_resources() -> None:
    result = _result()
    doc = fhir.bundle(result)
    assert doc == fhir.bundle(result)
    parsed = FhirBundle.parse_obj(doc)
    kinds = [e.resource.resource_type for e in parsed.entry]
    assert kinds == ["Device", "Observation", "Observation", "Observation", "DiagnosticReport"]
    report = parsed.entry[-1].resource
    assert report.status == "preliminary" and report.imagingStudy[0].identifier.value == f"urn:oid:{STUDY}"
    assert report.basedOn[0].identifier.value == "A|12^3" and report.basedOn[0].identifier.type.coding[0].code == "ACSN"
    assert [o.reference for o in report.result] == [e.fullUrl for e in parsed.entry[1:4]]
    flags = [(e.resource.code.coding[0].code, e.resource.interpretation[0].coding[0].code,
              float(e.resource.valueQuantity.value)) for e in parsed.entry[1:4]]
    assert flags == [("8186001", "N", 0.1), ("60046008", "AA", 0.8123), ("263654008", "A", 0.9)]
    assert all(e.resource.device.reference == parsed.entry[0].fullUrl for e in parsed.entry[1:4])
    assert parsed.identifier.value == result.control_id and all(e.request.method == "PUT" for e in parsed.entry)


@pytest.mark.parametrize("change", [
    lambda doc: doc["entry"][1]["resource"].pop("code"),  # Observation.code is required
    lambda doc: doc["entry"][1]["resource"].update(probability=0.5),  # not an Observation element
    lambda doc: doc["entry"][1]["resource"].update(issued="2026-12-03 01:02"),  # not a FHIR instant
])
def test_the_fhir_validator_can_fail(change) -> None:  # type: ignore[no-untyped-def]
    """fhir.resources checks structure, cardinality and datatypes (not value sets: the codes are
    asserted above and listed in docs/hl7.md)."""
    doc = fhir.bundle(_result())
    change(doc)
    with pytest.raises(ValidationError):
        FhirBundle.parse_obj(doc)


def test_the_documented_examples_are_valid() -> None:
    """docs/hl7.md's ORU and docs/examples/fhir-bundle.json came from a bench run: they must stay valid."""
    docs = Path(__file__).resolve().parents[3] / "docs"
    text = (docs / "hl7.md").read_text()
    example = text.split("```\nMSH|", 1)[1].split("```", 1)[0]
    message = _strict(("MSH|" + example).strip().replace("\n", "\r"))
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert "|AA|" in example  # the flagged example the text says it is
    bundle = FhirBundle.parse_obj(json.loads((docs / "examples" / "fhir-bundle.json").read_text()))
    assert bundle.entry[-1].resource.status == "preliminary"


def test_mllp_over_mutual_tls_with_the_dicom_tls_settings(tmp_path: Path) -> None:
    """``host:port+tls`` uses the DICOM TLS files: the peer checks our certificate, we check its."""
    trusted = authority(tmp_path, "trusted")
    peer = MllpPeer(tls=server_context(trusted.server.cert, trusted.server.key, trusted.ca.cert,
                                       require_peer_cert=True)).start()
    message = oru(_result(), "PLEURA")
    try:
        ours = client_context(trusted.ca.cert, trusted.client.cert, trusted.client.key)
        ack = parse_ack(mllp.exchange("127.0.0.1", peer.port, message, 5.0, ours), _result().control_id)
        assert ack.code == "AA" and len(peer.received) == 1
        with pytest.raises(OSError):  # no client certificate: the peer ends the handshake
            mllp.exchange("127.0.0.1", peer.port, message, 5.0, client_context(trusted.ca.cert))
        assert len(peer.received) == 1
    finally:
        peer.stop()
