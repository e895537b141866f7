"""Spool over its disk watermark (issue 5 item 6), on a real 64 MiB tmpfs under `pleura serve`.

A filler file leaves room for a few instances above ``PLEURA_MIN_FREE_DISK_MB``. C-STOREs past
the watermark get 0xA700 (Out of Resources), each refusal is an ``instance_refused`` event,
and nothing of a refused instance is on disk. Deleting the filler frees space and the same
listener process accepts the refused instances: intake resumes by itself, no restart.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.e2e.harness import embedded_env, pleura, running, wait_port
from tests.figures import save
from tests.reliability.ingest import (
    OUT_OF_RESOURCES,
    SUCCESS,
    Ledger,
    SendLog,
    dataset_bytes_of_file,
    send,
    small_studies,
    spool_files,
    wire_bytes,
)
from tests.support import free_port

TMPFS_MB, WATERMARK_MB, ROOM_FOR = 64, 32, 3.5
INSTANCES = 8

pytestmark = pytest.mark.integration


@pytest.fixture
def small_spool(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/var/spool`` as a 64 MiB tmpfs, unmounted afterwards."""
    spool = tmp_path / "var" / "spool"
    spool.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(spool)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_spool_full_refuses_then_resumes(nih: Path, tmp_path: Path, small_spool: Path) -> None:
    study = small_studies(nih, 1, INSTANCES, size=256)[0]
    sent = {str(ds.SOPInstanceUID): wire_bytes(ds) for ds in study}
    instance_bytes = max(map(len, sent.values())) + 512  # plus preamble and file meta
    filler = small_spool / "filler.bin"
    free = shutil.disk_usage(small_spool).free
    filler.write_bytes(b"\0" * int(free - WATERMARK_MB * 2**20 - ROOM_FOR * instance_bytes))
    port = free_port()
    env = {**embedded_env(tmp_path, port, free_port(), quiet=60), "PLEURA_MIN_FREE_DISK_MB": str(WATERMARK_MB)}
    serve = pleura("serve", env, tmp_path / "serve.log")
    ledger = Ledger(f"sqlite:///{tmp_path / 'var' / 'pleura.db'}")
    with running(serve), closing(ledger):
        wait_port(port, serve, timeout=120)
        full = SendLog()
        send(port, study, full, resend_after_abort=2)  # a C-STORE response pynetdicom lost is sent again
        statuses = [s for _, s in full.answers]
        accepted = statuses.count(SUCCESS)
        refused_uids = [uid for uid, s in full.answers if s == OUT_OF_RESOURCES]
        assert statuses == [SUCCESS] * accepted + [OUT_OF_RESOURCES] * len(refused_uids)
        assert accepted == int(ROOM_FOR) and refused_uids  # the watermark, not the disk, stopped intake
        refusals = ledger.rows("SELECT detail FROM events WHERE kind = 'instance_refused'")
        assert len(refusals) == len(refused_uids)
        assert all("0xA700" in r["detail"] and "spool full" in r["detail"] for r in refusals)
        assert {u for u in refused_uids if any(u in r["detail"] for r in refusals)} == set(refused_uids)
        files, temps = spool_files(small_spool)
        assert temps == [] and sorted(p.name for p in files) == sorted(
            ["filler.bin"] + [f"{uid}.dcm" for uid, s in full.answers if s == SUCCESS])
        assert ledger.scalar("SELECT count(*) FROM instances") == accepted

        filler.unlink()  # space returns; the same process carries on
        resumed = SendLog()
        send(port, [ds for ds in study if str(ds.SOPInstanceUID) in refused_uids], resumed, resend_after_abort=2)
        assert serve.alive()
        assert [s for _, s in resumed.answers] == [SUCCESS] * len(refused_uids)
        files, temps = spool_files(small_spool)
        assert temps == [] and len(files) == INSTANCES
        assert all(dataset_bytes_of_file(p) == sent[p.name[:-4]] for p in files)
        assert ledger.scalar("SELECT count(*) FROM instances") == INSTANCES
        save("spool_full", {
            "tmpfs_mb": TMPFS_MB, "watermark_mb": WATERMARK_MB, "instance_bytes": instance_bytes,
            "instances_sent": INSTANCES, "accepted_before_full": accepted, "refused_0xA700": len(refused_uids),
            "refusal_events": len(refusals), "partial_files": 0,
            "accepted_after_space_returned": len(resumed.answers), "listener_restarts": 0,
        })
