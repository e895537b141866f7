"""DICOM TLS, inbound (our listener) and outbound (our SCU), against real DCMTK TLS peers.

Certificates come from a throw-away PKI made with openssl: a trusted CA (ours) and a rogue
one, each with a server and a client certificate.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicom_node.scu import AssociationRejected, send_files
from dicom_node.tls import client_context, server_context
from tests.figures import save
from tests.security.pki import Authority, authority
from tests.security.test_associations import closed_by_peer, listener, rejections
from tests.support import free_port, require_tool, wait_for
from worker.destinations import Destination
from worker.ledger import Instance


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authority, Authority]:
    folder = tmp_path_factory.mktemp("pki")
    return authority(folder, "trusted"), authority(folder, "rogue")


def tls_echo(port: int, ctx: ssl.SSLContext) -> bool:
    """A C-ECHO over TLS from pynetdicom; True if the association and the echo succeeded."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="PLEURA", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0
    assoc.release()
    return ok


def raw_handshake(port: int, ctx: ssl.SSLContext) -> str:
    """A bare TLS handshake (and a read, where TLS 1.3 reports the server's verdict); the error or "ok"."""
    try:
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20),
                             server_hostname="localhost") as sock:
            sock.sendall(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # an A-RELEASE-RQ: any PDU will do
            sock.recv(16)
        return "ok"
    except (ssl.SSLError, OSError) as exc:
        return str(exc)


def lax_client(*, version: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    """A client that trusts anything and offers exactly what it is told (to probe the server)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        if version is not None:
            ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


def test_contexts_follow_the_bcp195_non_downgrading_profile(pki: tuple[Authority, Authority]) -> None:
    trusted, _ = pki
    server = server_context(trusted.server.cert, trusted.server.key, trusted.ca.cert)
    client = client_context(trusted.ca.cert, trusted.client.cert, trusted.client.key)
    for ctx in (server, client):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
        for cipher in ctx.get_ciphers():
            assert cipher["protocol"] == "TLSv1.3" or (cipher["kea"] == "kx-ecdhe" and cipher["aead"]), cipher
    assert server.verify_mode == ssl.CERT_REQUIRED and client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname
    with pytest.raises(ValueError, match="no CA file"):
        server_context(trusted.server.cert, trusted.server.key, None, require_peer_cert=True)
    optional = server_context(trusted.server.cert, trusted.server.key, trusted.ca.cert, require_peer_cert=False)
    assert optional.verify_mode == ssl.CERT_OPTIONAL


def test_inbound_tls_admits_only_trusted_clients_and_survives_failures(
    pki: tuple[Authority, Authority], pg_url: str, tmp_path: Path, real_cr: Path
) -> None:
    trusted, rogue = pki
    files = {"tls_cert_file": trusted.server.cert, "tls_key_file": trusted.server.key,
             "tls_ca_file": trusted.ca.cert, "tls_require_peer_cert": True, "acse_timeout_seconds": 5}
    with listener(pg_url, tmp_path, **files) as (scp, ledger):
        port = scp.address[1]
        good = client_context(trusted.ca.cert, trusted.client.cert, trusted.client.key)
        # A silent TCP peer holds a connection through the whole test: the accept loop must not wait on it.
        silent = socket.create_connection(("127.0.0.1", port))
        assert tls_echo(port, good)

        stored = subprocess.run(
            [require_tool("storescu"), "-xw", "+tls", str(trusted.client.key), str(trusted.client.cert),
             "+cf", str(trusted.ca.cert), "-aet", "MODALITY", "-aec", "PLEURA", "127.0.0.1", str(port), str(real_cr)],
            capture_output=True, text=True, timeout=60)
        assert stored.returncode == 0, stored.stdout + stored.stderr
        with ledger.session() as s:
            assert s.scalars(select(Instance.sop_instance_uid)).one() == dcmread(real_cr).SOPInstanceUID

        refused = {  # each must fail, and the server must say why
            "no client certificate": tls_echo(port, client_context(trusted.ca.cert)),
            "client certificate from an untrusted CA": tls_echo(
                port, client_context(trusted.ca.cert, rogue.client.cert, rogue.client.key)),
            "TLS 1.1 only": raw_handshake(
                port, lax_client(version=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")),
            "TLS 1.2 CBC cipher only": raw_handshake(
                port, lax_client(version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-SHA")),
        }
        assert refused["no client certificate"] is False
        assert refused["client certificate from an untrusted CA"] is False
        assert "alert protocol version" in refused["TLS 1.1 only"].lower()
        assert "handshake failure" in refused["TLS 1.2 CBC cipher only"].lower()
        plain = AE(ae_title="MODALITY")
        plain.add_requested_context(Verification)
        plain.acse_timeout = 10
        plaintext = plain.associate("127.0.0.1", port, ae_title="PLEURA")
        refused["plain DICOM to the TLS port"] = plaintext.is_established
        assert plaintext.is_established is False
        # Our client refuses a server whose certificate it cannot trust (it trusts only the rogue CA).
        distrusting = client_context(rogue.ca.cert, trusted.client.cert, trusted.client.key)
        refused["server certificate not trusted by the client"] = raw_handshake(port, distrusting)
        assert "certificate verify failed" in refused["server certificate not trusted by the client"].lower()

        assert closed_by_peer(silent, within=30) < 30  # dropped after the ACSE timeout...
        silent.close()
        assert tls_echo(port, good)  # ...and the listener still serves a trusted peer

        trail = wait_for(lambda: [e for e in rejections(ledger) if e["reason"].startswith("TLS")]
                         if len(rejections(ledger)) >= 7 else None, 15, "the handshake failures to be recorded")
    reasons = sorted(e["reason"] for e in trail)
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in r for r in reasons), reasons
    assert any("CERTIFICATE_VERIFY_FAILED" in r for r in reasons), reasons
    assert any("UNSUPPORTED_PROTOCOL" in r for r in reasons), reasons
    assert any("NO_SHARED_CIPHER" in r for r in reasons), reasons
    assert any("not completed within the ACSE timeout (5 s)" in r for r in reasons), reasons  # the silent peer
    assert all(e["peer_host"] == "127.0.0.1" for e in trail)
    save("security-tls-inbound", {
        "handshakes_meant_to_fail": len(refused),
        "failed_as_expected": sum(outcome not in (True, "ok") for outcome in refused.values()),
        "handshake_failures_recorded": len(trail), "reasons": reasons,
        "trusted_pynetdicom_echoes": 2, "dcmtk_tls_stores": stored.returncode == 0,
    })


@pytest.fixture
def dcmtk_tls_storescp(tmp_path: Path) -> Iterator:
    """Start DCMTK ``storescp +tls`` with a given server identity; yields a starter returning (port, folder)."""
    started: list[subprocess.Popen] = []

    def start(server_key: Path, server_cert: Path, ca: Path) -> tuple[int, Path]:
        port, out = free_port(), tmp_path / f"storescp-{len(started)}"
        out.mkdir()
        proc = subprocess.Popen(
            [require_tool("storescp"), "+xa", "-aet", "STORESCP", "-od", str(out), "+tls", str(server_key),
             str(server_cert), "+cf", str(ca), str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        wait_for(lambda: _listening(port), 20, "storescp to listen")
        return port, out

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


def _listening(port: int) -> bool:
    done = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10)
    return bool(done.stdout.strip())


def test_outbound_tls_to_dcmtk(pki: tuple[Authority, Authority], dcmtk_tls_storescp, real_cr: Path) -> None:  # type: ignore[no-untyped-def]
    trusted, rogue = pki
    ours = client_context(trusted.ca.cert, trusted.client.cert, trusted.client.key)
    port, out = dcmtk_tls_storescp(trusted.server.key, trusted.server.cert, trusted.ca.cert)
    target = Destination.parse(f"STORESCP@127.0.0.1:{port}+tls")
    assert target.tls and str(target) == f"STORESCP@127.0.0.1:{port}+tls"
    assert not Destination.parse(f"STORESCP@127.0.0.1:{port}").tls
    (result,) = send_files(target.host, target.port, [real_cr], called_ae=target.ae_title, tls=ours)
    assert result.ok, result
    (received,) = list(out.iterdir())
    assert dcmread(received).SOPInstanceUID == dcmread(real_cr).SOPInstanceUID

    failures = 0
    with pytest.raises(AssociationRejected, match="over TLS"):  # DCMTK requires our certificate
        send_files(target.host, port, [real_cr], called_ae="STORESCP", tls=client_context(trusted.ca.cert))
    failures += 1
    rogue_port, rogue_out = dcmtk_tls_storescp(rogue.server.key, rogue.server.cert, trusted.ca.cert)
    with pytest.raises(AssociationRejected, match="over TLS"):  # a server certificate from the wrong CA
        send_files("127.0.0.1", rogue_port, [real_cr], called_ae="STORESCP", tls=ours)
    failures += 1
    assert list(rogue_out.iterdir()) == [] and len(list(out.iterdir())) == 1
    save("security-tls-outbound", {"stores_meant_to_succeed": 1, "succeeded": 1,
                                   "handshakes_meant_to_fail": 2, "failed_as_expected": failures})
