"""Issue 16 must-show 2: RIS peers that fail, one `pleura serve`, one study, each destination its
own fault (timings compressed: first backoff 0.5 s, cap 2 s, answer timeout 2 s).

- an MLLP peer down until it was tried three times: retried, then delivered once;
- a peer that answers ``AR``: FAILED at once with the peer's text;
- a peer that answers garbage, and one that answers half a frame and holds the connection: a
  clean error each try (the timeout bounds the second), retried, nothing hangs;
- a TLS peer whose certificate is from another CA: refused (nothing sent), recorded, retried;
  the same peer with a certificate from our CA: delivered;
- a FHIR server answering 422 with an OperationOutcome: FAILED with its diagnostics.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from tests.e2e.harness import embedded_env, pleura, pleura_run, running, storescp, wait_port
from tests.reliability.services import synth_studies
from tests.ris import FhirServer, MllpPeer, RawPeer
from tests.security.pki import Authority, authority
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration

#: tries at the peer that is down before it comes back
DOWN_TRIES = 3
AR_TEXT = "Order not found in the RIS"
OUTCOME = {"resourceType": "OperationOutcome",
           "issue": [{"severity": "error", "code": "processing", "diagnostics": "Unknown ImagingStudy"}]}


def _server_tls(identity: Authority) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(identity.server.cert, identity.server.key)
    return ctx


def test_ris_faults_are_retried_refused_or_failed_with_the_peers_text(nih: Path, tmp_path: Path) -> None:
    synth_studies(nih, tmp_path / "studies", 1)
    trusted, rogue = authority(tmp_path / "pki", "trusted"), authority(tmp_path / "pki", "rogue")
    down_port = free_port()
    refusing = MllpPeer(mode="ar", text=AR_TEXT).start()
    garbage = RawPeer(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    half = RawPeer(b"\x0bMSH|^~\\&|RIS|||||ACK|1|P|2.5.1\rMSA|AA|", hold=60)
    impostor = MllpPeer(tls=_server_tls(rogue)).start()
    genuine = MllpPeer(tls=_server_tls(trusted)).start()
    fhir = FhirServer(status=422, body=OUTCOME)
    peers: list = [refusing, garbage, half, impostor, genuine, fhir]
    dest, dest_port = storescp(tmp_path / "received", tmp_path / "storescp.log")
    port = free_port()
    hl7_peers = {"down": f"127.0.0.1:{down_port}", "refusing": f"127.0.0.1:{refusing.port}",
                 "garbage": f"127.0.0.1:{garbage.port}", "half": f"127.0.0.1:{half.port}",
                 "impostor": f"127.0.0.1:{impostor.port}+tls", "genuine": f"127.0.0.1:{genuine.port}+tls"}
    env = {**embedded_env(tmp_path, port, dest_port, quiet=3),
           "PLEURA_NOTIFY_HL7": ",".join(hl7_peers.values()), "PLEURA_NOTIFY_FHIR": fhir.url,
           "PLEURA_TLS_CA_FILE": str(trusted.ca.cert), "PLEURA_NOTIFY_TIMEOUT_SECONDS": "2",
           "PLEURA_DELIVERY_BACKOFF_SECONDS": "0.5", "PLEURA_DELIVERY_BACKOFF_MAX_SECONDS": "2"}
    serve = pleura("serve", env, tmp_path / "serve.log")

    def rows() -> dict[str, dict]:
        found = json.loads(pleura_run(env, "audit", "notifications", "--format", "json"))
        names = {v: k for k, v in hl7_peers.items()} | {fhir.url: "fhir"}
        return {names[r["destination"]]: r for r in found}

    try:
        with running(serve, dest):
            wait_port(port, serve, timeout=120)
            pleura_run({}, "send", "127.0.0.1", str(port), str(tmp_path / "studies"), "--calling-ae", "MODALITY")
            first = wait_for(lambda: (r := rows()).get("down", {}).get("last_error") and r, 120,
                             "the first try at the peer that is down, recorded")
            assert first["down"]["state"] in ("PENDING", "SENDING")
            assert "ConnectionRefused" in first["down"]["last_error"]
            tried = wait_for(lambda: (r := rows())["down"]["attempts"] >= DOWN_TRIES and r, 120,
                             f"{DOWN_TRIES} tries at the peer that is down")
            assert tried["down"]["state"] in ("PENDING", "SENDING")
            assert "ConnectionRefused" in tried["down"]["last_error"]
            late = MllpPeer(port=down_port).start()  # the RIS is back, on the same port
            peers.append(late)
            done = wait_for(lambda: (r := rows())["down"]["state"] == "DELIVERED" and r["garbage"]["attempts"] >= 3
                            and r["half"]["attempts"] >= 3 and r["impostor"]["attempts"] >= 3
                            and (r["refusing"]["state"], r["genuine"]["state"], r["fhir"]["state"])
                            == ("FAILED", "DELIVERED", "FAILED") and r, 180,
                            "the peer that came back, three tries at each broken one, the others ended")
            status = pleura_run(env, "status")
            failures = json.loads(pleura_run(env, "audit", "failures", "--kind", "notification_failed",
                                             "--format", "json"))
    finally:
        for peer in peers:
            peer.stop()

    down = done["down"]
    assert down["attempts"] > DOWN_TRIES and down["peer_answer"] == "AA" and len(late.received) == 1  # delivered once
    assert done["refusing"]["state"] == "FAILED" and done["refusing"]["attempts"] == 1
    assert done["refusing"]["peer_answer"] == "AR" and AR_TEXT in done["refusing"]["last_error"]
    for name, error in (("garbage", "not an MLLP frame"), ("half", "no complete acknowledgment within 2 s")):
        assert done[name]["state"] in ("PENDING", "SENDING"), name
        assert error in done[name]["last_error"], (name, done[name]["last_error"])
    assert done["impostor"]["state"] in ("PENDING", "SENDING") and impostor.received == []  # nothing sent to it
    assert "certificate verify failed" in done["impostor"]["last_error"]
    assert done["genuine"]["state"] == "DELIVERED" and len(genuine.received) == 1
    assert done["fhir"]["state"] == "FAILED" and done["fhir"]["peer_answer"] == "HTTP 422"
    assert "Unknown ImagingStudy" in done["fhir"]["last_error"] and len(fhir.posts) == 1
    assert {f["destination"] for f in failures} == {f"HL7 {hl7_peers['refusing']}", f"FHIR {fhir.url}"}
    assert f"notification to HL7 {hl7_peers['refusing']} FAILED after 1 attempts: AR {AR_TEXT}" in status
