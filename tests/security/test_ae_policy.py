"""AE policy on the real listener: the called AE must be ours, the calling AE must be on the
allow-list (optionally from one host), and every rejection lands in the event trail."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sqlalchemy import select

from tests.figures import save
from tests.security.test_associations import echo_ae, listener, rejections
from tests.support import require_tool
from worker.ledger import Instance

CALLING_NOT_RECOGNIZED = (0x01, 0x01, 0x03)  # rejected permanent, service user, calling AE not recognized
CALLED_NOT_RECOGNIZED = (0x01, 0x01, 0x07)


def dcmtk(tool: str, port: int, *files: Path, calling: str, called: str = "PLEURA") -> subprocess.CompletedProcess[str]:
    """DCMTK ``echoscu`` or ``storescu`` (then with ``files``, sent as they are encoded)."""
    options = ["-xw"] if files else []
    return subprocess.run([require_tool(tool), *options, "-aet", calling, "-aec", called, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=60)


def pynetdicom_try(port: int, calling: str, called: str = "PLEURA", source: str = "127.0.0.1") -> tuple | None:
    """Associate from ``source``; None if accepted (then released), else the A-ASSOCIATE-RJ triple."""
    assoc = echo_ae(calling).associate("127.0.0.1", port, ae_title=called, bind_address=(source, 0))
    if assoc.is_established:
        assoc.release()
        return None
    assert assoc.is_rejected, "neither accepted nor rejected"
    rj = assoc.acceptor.primitive
    return rj.result, rj.result_source, rj.diagnostic


def test_allow_list_bound_to_hosts_and_called_ae(pg_url: str, tmp_path: Path, real_cr: Path) -> None:
    allowed = ["MODALITY@127.0.0.1", "ANYWHERE"]
    with listener(pg_url, tmp_path, allowed_calling_aes=allowed) as (scp, ledger):
        port = scp.address[1]
        # Real DCMTK peers: the allowed modality stores a real CR; a stranger and a wrong called AE are refused.
        stored = dcmtk("storescu", port, real_cr, calling="MODALITY")
        assert stored.returncode == 0, stored.stderr
        echo_stranger = dcmtk("echoscu", port, calling="INTRUDER")
        echo_wrong_called = dcmtk("echoscu", port, calling="MODALITY", called="NOTPLEURA")
        for done in (echo_stranger, echo_wrong_called):
            assert done.returncode != 0 and "Association Rejected" in done.stdout + done.stderr
        # pynetdicom from two loopback addresses: the host binding decides.
        outcomes = {
            "MODALITY from 127.0.0.1": pynetdicom_try(port, "MODALITY"),
            "ANYWHERE from 127.0.0.2": pynetdicom_try(port, "ANYWHERE", source="127.0.0.2"),
            "MODALITY from 127.0.0.2": pynetdicom_try(port, "MODALITY", source="127.0.0.2"),
            "lower-case modality": pynetdicom_try(port, "modality"),
            "wrong called AE": pynetdicom_try(port, "ANYWHERE", called="PACS"),
        }
        assert outcomes == {
            "MODALITY from 127.0.0.1": None,
            "ANYWHERE from 127.0.0.2": None,
            "MODALITY from 127.0.0.2": CALLING_NOT_RECOGNIZED,
            "lower-case modality": CALLING_NOT_RECOGNIZED,
            "wrong called AE": CALLED_NOT_RECOGNIZED,
        }
        with ledger.session() as s:
            assert s.scalars(select(Instance.sop_instance_uid)).all() != []  # the accepted C-STORE was kept
        trail = rejections(ledger, at_least=5)

    assert [(e["calling_ae"], e["called_ae"], e["peer_host"], e["reason"]) for e in trail] == [
        ("INTRUDER", "PLEURA", "127.0.0.1", "calling AE title 'INTRUDER' is not in the allow-list"),
        ("MODALITY", "NOTPLEURA", "127.0.0.1", "called AE title 'NOTPLEURA' is not 'PLEURA'"),
        ("MODALITY", "PLEURA", "127.0.0.2", "calling AE title 'MODALITY' is not allowed from 127.0.0.2"),
        ("modality", "PLEURA", "127.0.0.1", "calling AE title 'modality' is not in the allow-list"),
        ("ANYWHERE", "PACS", "127.0.0.1", "called AE title 'PACS' is not 'PLEURA'"),
    ]
    tried = 2 + 1 + len(outcomes)
    rejected = 2 + sum(o is not None for o in outcomes.values())
    save("security-ae-policy", {"associations_tried": tried, "expected_rejections": 5, "rejected": rejected,
                                "accepted": tried - rejected, "rejections_in_event_trail": len(trail),
                                "dcmtk_peers": 3, "pynetdicom_peers": len(outcomes)})


def test_empty_allow_list_admits_any_calling_ae_but_still_checks_the_called_ae(pg_url: str, tmp_path: Path) -> None:
    with listener(pg_url, tmp_path) as (scp, ledger):
        port = scp.address[1]
        assert dcmtk("echoscu", port, calling="WHOEVER").returncode == 0
        assert pynetdicom_try(port, "SOMEONE", source="127.0.0.2") is None
        assert pynetdicom_try(port, "SOMEONE", called="OTHER") == CALLED_NOT_RECOGNIZED
        assert [e["reason"] for e in rejections(ledger, at_least=1)] == ["called AE title 'OTHER' is not 'PLEURA'"]
