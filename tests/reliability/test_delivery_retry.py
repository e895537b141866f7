"""Issue 5 item 5: a destination down for a while, and one that never comes back.

Timings are compressed (first backoff 0.5 s, cap 4 s, horizon 25 s) so that "minutes" fit in
a test: deliveries to a stopped DCMTK storescp retry with doubling delays up to the cap and
succeed once storescp is back on the same port; deliveries to a destination that never
answers end FAILED at the horizon, in the ledger, the event trail and ``pleura status``.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.e2e.harness import Proc, pleura, pleura_run, wait_port
from tests.figures import save
from tests.reliability.ingest import Ledger as SQL
from tests.reliability.services import PrivateRedis, pleura_env, received_by_study, synth_studies
from tests.support import free_port, require_tool, wait_for

pytestmark = pytest.mark.integration

BACKOFF, CAP, HORIZON = 0.5, 4.0, 25.0
STUDIES = 2


def _storescp(out: Path, log: Path, port: int) -> Proc:
    out.mkdir(parents=True, exist_ok=True)
    proc = Proc([require_tool("storescp"), "-aet", "DEST", "-od", str(out), "-uf", "+xa", str(port)], log)
    wait_port(port, proc)
    return proc


def test_deliveries_back_off_then_succeed_or_fail_at_the_horizon(
    pg_url: str, nih: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    synth_studies(nih, tmp_path / "studies", STUDIES)
    cleanup = request.addfinalizer  # run last-in first-out, each even if another fails
    redis = PrivateRedis(tmp_path / "redis")
    cleanup(redis.close)
    dest_port, dead_port, port = free_port(), free_port(), free_port()
    dests = [_storescp(tmp_path / "received", tmp_path / "storescp1.log", dest_port)]
    cleanup(lambda: [d.stop() for d in dests])
    dests[0].stop()  # down before any result exists
    env = pleura_env(tmp_path, pg_url, redis.url, port, f"DEST@127.0.0.1:{dest_port},DEAD@127.0.0.1:{dead_port}",
                     delivery_backoff_seconds=BACKOFF, delivery_backoff_max_seconds=CAP,
                     delivery_horizon_seconds=HORIZON)
    pleura_run(env, "db", "upgrade")
    listen = pleura("listen", env, tmp_path / "listen.log")
    cleanup(listen.stop)
    work = pleura("worker", env, tmp_path / "worker.log")
    cleanup(work.stop)
    ledger_sql = SQL(pg_url)
    cleanup(ledger_sql.close)
    rows = ledger_sql.rows

    def deliveries(destination: str) -> list:  # type: ignore[type-arg]
        return rows("SELECT d.*, o.created_at AS produced_at FROM deliveries d JOIN output_objects o "
                    "ON o.id = d.output_object_id WHERE d.destination LIKE :d ORDER BY d.id", d=f"{destination}@%")

    try:
        wait_port(port, listen)
        pleura_run({}, "send", "127.0.0.1", str(port), str(tmp_path / "studies"), "--calling-ae", "MODALITY")
        # down long enough for the delay to reach the cap and stay there: 0.5 + 1 + 2 + 4 + 4 s
        wait_for(lambda: (d := deliveries("DEST")) and len(d) == 2 * STUDIES and min(x["attempts"] for x in d) >= 6,
                 120, "six failed tries per delivery to the stopped destination", interval=0.5)
        down_seconds = (datetime.now().astimezone() - min(x["produced_at"] for x in deliveries("DEST"))).total_seconds()
        dests.append(_storescp(tmp_path / "received", tmp_path / "storescp2.log", dest_port))  # back, same port
        wait_for(lambda: all(x["state"] == "DELIVERED" for x in deliveries("DEST")), 60,
                 "deliveries once the destination is back", interval=0.5)
        wait_for(lambda: all(x["state"] == "FAILED" for x in deliveries("DEAD")), HORIZON + 60,
                 "deliveries to the dead destination to end FAILED at the horizon", interval=0.5)

        held = received_by_study(tmp_path / "received")
        assert len(held) == STUDIES and all(len(c) == 2 and set(c.values()) == {1} for c in held.values())
        events = rows("SELECT at, kind, detail FROM events WHERE kind IN ('delivery_retry', 'delivered', "
                      "'delivery_failed') ORDER BY id")
        trail: dict[int, list[tuple[datetime, str, dict]]] = {}
        for e in events:
            detail = json.loads(e["detail"])
            trail.setdefault(detail["delivery_id"], []).append((e["at"], e["kind"], detail))

        expected = [min(BACKOFF * 2 ** i, CAP) for i in range(20)]
        intervals = []
        for d in deliveries("DEST"):
            assert d["peer_status"] == 0 and d["last_error"] is None and d["delivered_at"] is not None
            steps = trail[d["id"]]
            assert [k for _, k, _ in steps] == ["delivery_retry"] * (d["attempts"] - 1) + ["delivered"]
            delays = [detail["retry_in_seconds"] for _, _, detail in steps[:-1]]
            assert delays == expected[:len(delays)], delays  # 0.5, 1, 2, 4, 4, ...: doubling, capped
            gaps = [(b[0] - a[0]).total_seconds() for a, b in zip(steps, steps[1:], strict=False)]
            for delay, gap in zip(delays, gaps, strict=True):  # each try waited its delay (plus a sweep)
                assert delay <= gap + 0.05, (delays, gaps)
                assert gap < delay + 5, (delays, gaps)
            intervals.append([round(g, 2) for g in gaps])

        dead = deliveries("DEAD")
        for d in dead:
            assert d["last_error"] and d["peer_status"] is None
            *retries, (failed_at, kind, detail) = trail[d["id"]]
            assert kind == "delivery_failed" and detail["reason"] == "delivery horizon passed"
            assert all(k == "delivery_retry" for _, k, _ in retries) and len(retries) == d["attempts"] - 1
            assert d["produced_at"] + timedelta(seconds=HORIZON) <= failed_at
            assert failed_at < d["produced_at"] + timedelta(seconds=HORIZON + 10)  # the last try is at the horizon

        status = pleura_run(env, "status")
        assert status.count(f"to DEAD@127.0.0.1:{dead_port} FAILED after") == 2 * STUDIES
        assert status.count("deliveries: DELIVERED 2, FAILED 2") == STUDIES
        save("delivery_retry", {
            "studies_sent": STUDIES, "objects_per_destination": 2 * STUDIES,
            "backoff_first_seconds": BACKOFF, "backoff_cap_seconds": CAP, "horizon_seconds": HORIZON,
            "destination_down_seconds": round(down_seconds, 1),
            "retries_before_delivery": [d["attempts"] - 1 for d in deliveries("DEST")],
            "retry_intervals_seconds": intervals,
            "delivered_after_return": len(deliveries("DEST")),
            "duplicates_delivered": sum(c - 1 for copies in held.values() for c in copies.values()),
            "failed_at_horizon": len(dead), "attempts_before_failing": [d["attempts"] for d in dead],
        })
    except BaseException:
        print(f"--- listen\n{listen.tail()}\n--- worker\n{work.tail()}")
        raise
