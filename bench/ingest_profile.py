"""Where the listener's time goes: py-spy samples ``pleura listen`` while bench.ingest's sender runs.

    .venv/bin/python -m bench.ingest_profile [--files 48] [--syntax explicit] [--associations 4]
        [--storage local] [--rate 250] [--top 10] [--out bench/results] [--name ingest-profile]

The receiver is bench.ingest's (``pleura listen --no-sweeper``, production mode, PostgreSQL ledger,
RabbitMQ hints, ``--listen-processes`` processes), warmed up the same way. ``--files`` are sent in
two halves. During the first, nothing samples: the CPU time of the listener's processes (user and
system, from /proc) and of every ``postgres`` process is read before and after, per instance.
During the second, py-spy (``pip install py-spy``) records every listener process
(``--subprocesses``), sampling
threads that are running (on the CPU or in a system call that holds them: a write, an fsync, a
socket read), not those waiting for work. Figures are milliseconds of sampled thread time per
instance, summed over the threads of all processes (with 4 associations several run at once, so the
sum exceeds the wall time). ``inclusive``: time in a function and everything it called; ``self``:
in the function itself. Lines of worker/listen/receiver.py and worker/storage/ are listed apart:
each is one ledger statement or storage call of an instance's transaction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.common import host
from bench.ingest import WARM_UP_FILES, dataset, pleura, send

PY_SPY = str(Path(sys.executable).with_name("py-spy"))
TICKS = os.sysconf("SC_CLK_TCK")
#: Where an instance's ledger statements and storage calls are written: their lines are listed apart.
LEDGER_FILES = ("worker/listen/receiver.py", "worker/storage/")


def _frames(stack: str) -> list[str]:
    """``"function (file:line)"`` frames of one collapsed stack, outermost first, without the process,
    the thread and the threading module's frames that start every thread."""
    return [f for f in stack.split(";") if not f.startswith(("process ", "thread ")) and "(threading.py:" not in f]


def _short(frame: str) -> str:
    """``function (path:line)`` with the path from the site-packages or the repository on."""
    name, _, where = frame.partition(" (")
    for marker in ("site-packages/", "/lib/python3.11/", "/work/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    for root in ("main/", "ci"):  # a checkout's own folder name
        if where.startswith(root) and "/" in where:
            where = where.split("/", 1)[1]
    return f"{name} ({where}" if where else name


def summarise(raw: Path, rate: int, instances: int, top: int) -> dict:
    """Top functions (inclusive and self) and ledger lines, in ms of sampled thread time per instance."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    ledger: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples, frames = int(count), [_short(f) for f in _frames(stack)]
        total += samples
        if frames:
            own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
            if any(f"{path}" in frame for path in LEDGER_FILES):
                ledger[frame] += samples

    def per_instance(counter: Counter[str]) -> list[dict]:
        return [{"frame": frame, "ms_per_instance": round(n / rate * 1000 / instances, 2)}
                for frame, n in counter.most_common(top)]

    return {"samples": total, "ms_per_instance_total": round(total / rate * 1000 / instances, 2),
            "top_inclusive": per_instance(inclusive), "top_self": per_instance(own),
            "ledger_and_storage_lines": per_instance(ledger)}


def _cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of ``pids`` (all their threads), from /proc."""
    user = system = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        user, system = user + int(fields[11]) / TICKS, system + int(fields[12]) / TICKS
    return user, system


def _processes(parent: int) -> tuple[list[int], list[int]]:
    """The listener's processes (``parent`` and its children) and every ``postgres`` process."""
    listener, postgres = [parent], []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1:text.rindex(")")], text.rsplit(")", 1)[1].split()
        if int(rest[1]) == parent:
            listener.append(int(stat.parent.name))
        elif comm == "postgres":
            postgres.append(int(stat.parent.name))
    return listener, postgres


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=48)
    parser.add_argument("--syntax", default="explicit")
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--storage", default="local", choices=("local", "database"))
    parser.add_argument("--listen-processes", type=int, default=2)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL (py-spy --gil)")
    parser.add_argument("--raw", type=Path, help="also keep py-spy's collapsed stacks here")
    parser.add_argument("--pg-admin", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rabbitmq-host", default="127.0.0.1:5672")
    parser.add_argument("--data", type=Path, default=Path("build/ingest-data"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--name", default="ingest-profile")
    args = parser.parse_args(argv)
    if not Path(PY_SPY).exists() and not shutil.which("py-spy"):
        sys.exit("error: py-spy is not installed: .venv/bin/pip install py-spy")
    files = dataset(args.data, args.syntax, args.files + WARM_UP_FILES)
    files, warm_up = files[:args.files], files[args.files:]
    timed, sampled = files[:len(files) // 2], files[len(files) // 2:]
    report: dict = {"command": " ".join(["python -m bench.ingest_profile", *(argv or sys.argv[1:])]),
                    "method": __doc__.split("\n\n", 2)[2].strip().replace("\n", " "), "host": host()}
    with tempfile.TemporaryDirectory(prefix="pleura-profile-") as tmp:
        workdir, started = Path(tmp), []
        with pleura(workdir, args.pg_admin, args.rabbitmq_host, args.listen_processes, args.storage,
                    on_start=started.append) as (port, called_ae, _count):
            send(port, called_ae, warm_up, args.associations)
            listener, postgres = _processes(started[0].pid)
            before = _cpu_seconds(listener), _cpu_seconds(postgres)
            cpu_wall = send(port, called_ae, timed, args.associations)
            after = _cpu_seconds(listener), _cpu_seconds(postgres)
            per = 1000 / len(timed)
            cpu = {"listener_user": (after[0][0] - before[0][0]) * per,
                   "listener_system": (after[0][1] - before[0][1]) * per,
                   "postgres": (sum(after[1]) - sum(before[1])) * per}
            raw = workdir / "py-spy.txt"
            spy = subprocess.Popen([shutil.which("py-spy") or PY_SPY, "record", "--pid", str(started[0].pid),
                                    "--subprocesses", "--format", "raw", "--rate", str(args.rate),
                                    "--output", str(raw), *(["--gil"] if args.gil else [])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(2)  # py-spy attaches to every process of the listener
            wall = send(port, called_ae, sampled, args.associations)
            spy.send_signal(signal.SIGINT)
            _, err = spy.communicate(60)
            if not raw.exists():
                sys.exit(f"error: py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
            if args.raw:
                shutil.copy(raw, args.raw)
            report.update(files=len(files), syntax=args.syntax, associations=args.associations,
                          storage=args.storage, cpu_send_seconds=round(cpu_wall, 3),
                          cpu_ms_per_instance={k: round(v, 1) for k, v in cpu.items()},
                          sampled_send_seconds=round(wall, 3), rate=args.rate, gil_only=args.gil,
                          **summarise(raw, args.rate, len(sampled), args.top))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    for key in ("top_inclusive", "top_self", "ledger_and_storage_lines"):
        print(key, file=sys.stderr)
        for row in report[key]:
            print(f"  {row['ms_per_instance']:7.2f} ms  {row['frame']}", file=sys.stderr)
    print(f"CPU per instance (ms): {report['cpu_ms_per_instance']} over {len(timed)} instances in "
          f"{report['cpu_send_seconds']} s", file=sys.stderr)
    print(f"[{report['sampled_send_seconds']} s sending under py-spy, {report['ms_per_instance_total']} ms of "
          f"sampled thread time per instance] wrote {args.out / args.name}.json", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
