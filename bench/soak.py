"""The long soak: 1,000 instances (40 studies x 25 images) from 4 senders into production mode, a worker killed.

    .venv/bin/python -m bench.soak [--studies 40] [--per-study 25] [--senders 4]
        [--nih ../shared/data/nih-cxr14-sample] [--pg-admin URL] [--name soak] [--out bench/results]

The scenario and every check are the test suite's (:mod:`tests.reliability.soak`; the suite runs
a short one, tests/reliability/test_soak.py): `pleura listen` and two `pleura worker` processes on
a fresh PostgreSQL database and a private RabbitMQ node, one worker killed -9 mid-inference while
instances arrive and restarted, every study delivered exactly once. Writes the figures (ingest
and end-to-end rates, when the kill came, attempts, resends) to ``<out>/<name>.json``; exits
non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import host, postgres_db
from tests.reliability import soak
from tests.reliability.services import PrivateRabbitMQ
from tests.support import NIH, PG_ADMIN_URL

LONG = soak.Soak(studies=40, per_study=25)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=LONG.studies)
    parser.add_argument("--per-study", type=int, default=LONG.per_study)
    parser.add_argument("--senders", type=int, default=LONG.senders)
    parser.add_argument("--nih", type=Path, default=NIH)
    parser.add_argument("--pg-admin", default=PG_ADMIN_URL)
    parser.add_argument("--name", default="soak")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    plan = soak.Soak(studies=args.studies, per_study=args.per_study, senders=args.senders)
    command = " ".join(["python -m bench.soak", *(argv if argv is not None else sys.argv[1:])])
    report: dict[str, Any] = {"command": command, "host": host(), "plan": vars(plan) | {"instances": plan.instances}}
    out = args.out / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def record(figures: dict[str, Any]) -> None:
        report["figures"] = figures
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(json.dumps(figures, indent=2, default=str), file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="pleura-soak-") as scratch, postgres_db(args.pg_admin) as pg_url:
        broker = PrivateRabbitMQ()
        try:
            soak.run(plan, pg_url, broker.url, args.nih, Path(scratch), record)
        finally:
            broker.close()
    report["checks"] = "passed"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}; every check passed", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
