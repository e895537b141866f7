"""Issue 16 must-show 1: studies through `pleura serve` reach the RIS as HL7 v2 and FHIR.

Two MLLP peers run the ``hl7`` library's asyncio server: one acknowledges every message, the
other closes the connection without an answer the first time it sees a message, so Pleura
sends it again. A FHIR server takes the Bundles. Every ORU must pass hl7apy's strict ORU_R01
2.5.1 validation, every Bundle fhir.resources'; the triage flag (OBX-8 ``AA``) must be on
exactly the studies whose triage finding (the demo's Effusion) the ledger records as positive;
a resend must be the same message.
"""

from __future__ import annotations

import json
from pathlib import Path

import hl7
import pytest
from fhir.resources.R4B.bundle import Bundle as FhirBundle
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom import dcmread

from tests.e2e.harness import embedded_env, pleura, pleura_run, running, storescp, wait_port
from tests.reliability.services import synth_studies
from tests.ris import FhirServer, MllpPeer
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration

STUDIES = 6
TOKEN = "s3cret-token-for-the-test"


def test_results_reach_the_ris_over_mllp_and_fhir(nih: Path, tmp_path: Path) -> None:
    sources = {str(ds.StudyInstanceUID): ds for ds in (
        dcmread(p, stop_before_pixels=True) for p in synth_studies(nih, tmp_path / "studies", STUDIES))}
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    steady, flaky, server = MllpPeer().start(), MllpPeer(mode="drop_first").start(), FhirServer()
    token = tmp_path / "fhir-token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    env = {**embedded_env(tmp_path, port, dest_port, quiet=3),
           "PLEURA_NOTIFY_HL7": f"127.0.0.1:{steady.port},127.0.0.1:{flaky.port}",
           "PLEURA_NOTIFY_FHIR": server.url, "PLEURA_NOTIFY_FHIR_TOKEN_FILE": str(token),
           "PLEURA_DELIVERY_BACKOFF_SECONDS": "0.5"}
    serve = pleura("serve", env, tmp_path / "serve.log")
    try:
        with running(serve, dest):
            wait_port(port, serve, timeout=120)
            pleura_run({}, "send", "127.0.0.1", str(port), str(tmp_path / "studies"), "--calling-ae", "MODALITY")
            wait_for(lambda: len(steady.received) >= STUDIES and len(flaky.received) >= 2 * STUDIES
                     and len(server.posts) >= STUDIES, 120, "every study at both MLLP peers and the FHIR server")

            def recorded() -> list:  # type: ignore[type-arg]
                rows = json.loads(pleura_run(env, "audit", "notifications", "--format", "json"))
                return rows if len(rows) == 3 * STUDIES and all(r["state"] == "DELIVERED" for r in rows) else []

            notifications = wait_for(recorded, 30, "every acknowledgment recorded in the ledger", interval=0.5)
            status = {r["study_instance_uid"]: r for r in json.loads(pleura_run(env, "status", "--json"))}
            table = pleura_run(env, "status")
            log = (tmp_path / "serve.log").read_text()
    finally:
        for peer in (steady, flaky, server):
            peer.stop()

    # one ORU per study at the steady peer, each valid ORU_R01 2.5.1 for hl7apy's strict validation
    assert len(steady.received) == STUDIES
    flagged: dict[str, bool] = {}
    for got in steady.received:
        message = parse_message(got.text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        assert message.validate() is True
        parsed = hl7.parse(got.text)
        study = next(str(o(5)) for o in parsed.segments("OBX") if str(o(3)(0)(1)) == "110180")
        source = sources[study]
        assert str(parsed.segment("PID")(3)(0)(1)) == source.PatientID
        assert str(parsed.segment("PID")(5)(0)(1)) == source.PatientName.family_name
        assert str(parsed.segment("OBR")(18)) == source.AccessionNumber and str(parsed.segment("OBR")(25)) == "P"
        flags = {str(o(3)(0)(2)): str(o(8)) for o in parsed.segments("OBX") if str(o(2)) == "NM"}
        assert flags["Pleural effusion"] in ("AA", "N"), "the triage finding is AA when positive"
        assert "AA" not in [f for meaning, f in flags.items() if meaning != "Pleural effusion"]
        flagged[study] = flags["Pleural effusion"] == "AA"
    assert set(flagged) == set(sources), "every study was notified once"
    # AA exactly where the ledger says the triage finding is positive, and both kinds of study were seen
    assert flagged == {uid: "Effusion" in r["positive_findings"] for uid, r in status.items()}
    assert True in flagged.values() and False in flagged.values(), f"need flagged and unflagged studies: {flagged}"

    # the flaky peer: each message twice (the first answered with a closed connection), identical
    resent: dict[str, list[str]] = {}
    for got in flaky.received:
        resent.setdefault(str(hl7.parse(got.text).segment("MSH")(10)), []).append(got.text)
    assert len(resent) == STUDIES and all(len(copies) == 2 and copies[0] == copies[1] for copies in resent.values())
    assert set(resent) == set(steady.control_ids()), "a result has one control ID at every peer"

    # the FHIR Bundles: valid for fhir.resources (R4B), the bearer token sent, one per study
    assert len(server.posts) == STUDIES
    for _at, path, headers, body in server.posts:
        assert path == "/fhir" and headers["Authorization"] == f"Bearer {TOKEN}"
        assert headers["Content-Type"].startswith("application/fhir+json")
        bundle = FhirBundle.parse_obj(body)
        report = bundle.entry[-1].resource
        study = report.imagingStudy[0].identifier.value.removeprefix("urn:oid:")
        assert report.status == "preliminary" and report.subject.identifier.value == sources[study].PatientID
        triage = next(e.resource for e in bundle.entry if e.resource.resource_type == "Observation"
                      and e.resource.code.coding[0].code == "60046008")
        assert (triage.interpretation[0].coding[0].code == "AA") == flagged[study]
        assert bundle.identifier.value in resent

    # the ledger: one DELIVERED row per (result, destination), attempts as the peers saw them
    assert len(notifications) == 3 * STUDIES and {n["state"] for n in notifications} == {"DELIVERED"}
    tries = {(n["protocol"], n["destination"].split(":")[-1]): n["attempts"] for n in notifications}
    assert tries[("HL7", str(steady.port))] == 1 and tries[("HL7", str(flaky.port))] == 2
    assert {n["peer_answer"] for n in notifications} == {"AA", "HTTP 200"}
    assert all(bool(n["triage"]) == flagged[n["study_instance_uid"]] for n in notifications)
    assert all(n["notify_s"] is not None and n["notify_s"] >= 0 for n in notifications)
    assert "3/3 flagged" in table and "3/3" in table

    for source in sources.values():  # the messages carry PHI; the logs never do
        for phi in (str(source.PatientName), source.PatientID, source.PatientBirthDate):
            assert phi and phi not in log, "patient identifiers must never reach the logs"
