"""How soon the RIS hears of a result: RIS notification latency after the SR's delivery.

    .venv/bin/python -m bench.notify [--rate 1] [--studies 20] [--modes embedded,production]
        [--transfer-syntax j2k] [--nih ../shared/data/nih-cxr14-sample]
        [--pg-admin URL] [--rabbitmq-host 127.0.0.1:5672] [--name notify] [--out bench/results]

Each mode (``embedded``: ``pleura serve``; ``production``: ``pleura listen`` + one ``pleura worker``
on a fresh PostgreSQL database and RabbitMQ virtual host) delivers to a DCMTK ``storescp`` and
notifies an MLLP peer (the ``hl7`` library's asyncio server, ``tests/ris.py``, answering ``AA``)
and a FHIR server. Studies as in :mod:`bench.time_to_result`, study k leaving at ``k / rate`` s.

Per study: ``after_sr_s`` = (the MLLP peer's receipt of the ORU) - (mtime of the SR file at
``storescp``), both clocks of this host; and, from the ledger (``v_notifications``), ``notify_s``
= the peer's acceptance recorded - the notification's release (the SR delivery recorded), per
destination. Reports p50/p95/max of each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import hl7
import numpy as np

from bench.common import free_port, host, postgres_db, process, rabbitmq_vhost, wait_port
from bench.time_to_result import NIH, PLEURA, fresh_study, send_study, start_destination, start_production, templates
from tests.ris import FhirServer, MllpPeer

STUDY_UID_OBX = "110180"


def _pct(values: list[float]) -> dict[str, float | None]:
    def q(p: float) -> float | None:
        return round(float(np.percentile(values, p)), 3) if values else None
    return {"n": len(values), "p50_s": q(50), "p95_s": q(95), "max_s": q(100)}


def _study_of(text: str) -> str:
    return next(str(o(5)) for o in hl7.parse(text).segments("OBX") if str(o(3)(0)(1)) == STUDY_UID_OBX)


def run_mode(mode: str, args: argparse.Namespace, pool: list, tmp: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        dest_port, dest = start_destination(stack, tmp)
        peer, fhir = MllpPeer().start(), FhirServer()
        stack.callback(peer.stop)
        stack.callback(fhir.stop)
        port = free_port()
        env = {"PLEURA_DATA_DIR": str(tmp / "var"), "PLEURA_DICOM_PORT": str(port), "PLEURA_MIN_FREE_DISK_MB": "20",
               "PLEURA_DESTINATIONS": f"DEST@127.0.0.1:{dest_port}", "PLEURA_NOTIFY_HL7": f"127.0.0.1:{peer.port}",
               "PLEURA_NOTIFY_FHIR": fhir.url}
        if mode == "embedded":
            serve = stack.enter_context(process([PLEURA, "serve"], tmp / "serve.log", env))
            wait_port(port, serve, tmp / "serve.log")
        else:
            env["PLEURA_DATABASE_URL"] = stack.enter_context(postgres_db(args.pg_admin))
            env["PLEURA_BROKER_URL"] = stack.enter_context(rabbitmq_vhost(args.rabbitmq_host))
            start_production(stack, env, tmp)
        total = args.studies + 2  # two warm-up studies first (model load, connections), not counted
        studies = [fresh_study(pool, k, 1) for k in range(total)]
        uids = [str(s[0].StudyInstanceUID) for s in studies]
        t0 = time.monotonic()
        for k, study in enumerate(studies):
            time.sleep(max(0.0, t0 + k / args.rate - time.monotonic()))
            send_study(port, study)
        dest.wait(uids, 90)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (len(peer.received) < total or len(fhir.posts) < total):
            time.sleep(0.1)
        rows = json.loads(subprocess.run([PLEURA, "audit", "notifications", "--format", "json", "--limit", "1000"],
                                         env={**os.environ, **env}, capture_output=True, text=True, check=True,
                                         timeout=120).stdout)
    counted = set(uids[2:])
    heard = {_study_of(r.text): r.at for r in peer.received}
    after_sr = [heard[u] - dest.sr_at[u] for u in counted if u in heard and u in dest.sr_at]
    ledger = {p: [r["notify_s"] for r in rows if r["protocol"] == p and r["study_instance_uid"] in counted
                  and r["notify_s"] is not None] for p in ("HL7", "FHIR")}
    return {"mode": mode, "studies": args.studies, "rate_per_s": args.rate,
            "hl7_received": len([u for u in counted if u in heard]),
            "fhir_received": sum(1 for r in rows if r["protocol"] == "FHIR" and r["state"] == "DELIVERED"
                                 and r["study_instance_uid"] in counted),
            "oru_after_sr_at_storescp": _pct(after_sr),
            "ledger_release_to_accepted": {p: _pct(v) for p, v in ledger.items()},
            "after_sr_s": sorted(round(v, 3) for v in after_sr),
            "example_oru": next((r.text for r in peer.received if "|AA|" in r.text),
                                peer.received[-1].text if peer.received else None),
            "example_fhir": next((body for *_, body in fhir.posts if '"code":"AA"' in json.dumps(body,
                                  separators=(",", ":"))), fhir.posts[-1][3] if fhir.posts else None)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1.0, help="studies per second")
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--modes", default="embedded,production")
    parser.add_argument("--transfer-syntax", default="j2k", choices=["explicit", "j2k", "rle", "jpegls"])
    parser.add_argument("--nih", type=Path, default=NIH)
    parser.add_argument("--pg-admin", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rabbitmq-host", default="127.0.0.1:5672")
    parser.add_argument("--name", default="notify", help="stem of the JSON written")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    started = time.time()
    runs = []
    with tempfile.TemporaryDirectory(prefix="pleura-notify-") as scratch:
        pool = templates(args.nih, 8, args.transfer_syntax, Path(scratch) / "pool")
        for mode in args.modes.split(","):
            (Path(scratch) / mode).mkdir()
            run = run_mode(mode, args, pool, Path(scratch) / mode)
            runs.append(run)
            a, h = run["oru_after_sr_at_storescp"], run["ledger_release_to_accepted"]["HL7"]
            print(f"{mode:10s} {args.rate:g}/s: ORU {run['hl7_received']}/{args.studies}, after the SR p50 "
                  f"{a['p50_s']} p95 {a['p95_s']} max {a['max_s']} s; ledger HL7 p50 {h['p50_s']} p95 {h['p95_s']} s",
                  flush=True)
    report = {"benchmark": "notify", "host": host(),
              "command": " ".join([".venv/bin/python -m bench.notify", *(argv or sys.argv[1:])]),
              "definition": "MLLP peer receipt of the ORU - SR file mtime at storescp; ledger: "
                            "v_notifications.notify_s (release to accepted)",
              "transfer_syntax": args.transfer_syntax, "runs": runs, "wall_s": round(time.time() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
