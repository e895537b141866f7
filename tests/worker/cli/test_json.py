"""Every ``pleura`` command that prints records takes ``--json`` and prints one JSON document on
stdout; ``pleura --help`` lists every command with a description.

Run in-process on small SQLite ledgers (the audit tests' three studies, two archived
embeddings), an in-process C-STORE peer, 30 NIH images with the demo bundle and the
hand-built language-aligned bundle. ``models ...`` is covered by tests/worker/cli/test_bundles.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt

from tests.engines.aligned_pair import write_aligned_bundle
from tests.support import free_port
from tests.worker.archived import archive_studies
from tests.worker.ledger.test_audit import A, B, C, _populate
from worker.cli import build_parser, main
from worker.ledger.db import Ledger, upgrade


def _json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict | list:
    capsys.readouterr()
    main(list(argv))
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def ledger_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("PLEURA_DATABASE_URL", url)
    monkeypatch.setenv("PLEURA_DATA_DIR", str(tmp_path / "var"))
    return url


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """``{name: help}`` of the parser's subcommands ({} if it has none)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {c.dest: c.help for a in actions for c in a._choices_actions}


def test_help_lists_every_command_with_a_description(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per command
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and "Pleura receives chest X-ray studies" in text
    listed = dict(re.findall(r"^    (\S+) +(\S.*)$", text, re.MULTILINE))
    parser = build_parser()
    commands = _subcommands(parser)
    assert set(commands) == set(listed) >= {"serve", "status", "audit", "heads", "eval", "models"}
    assert all(listed[name] == commands[name] for name in commands)
    [choices] = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    nested = {f"{name} {sub}": text for name, p in choices.items() for sub, text in _subcommands(p).items()}
    assert {"heads train", "audit timeline", "audit role"} <= set(nested) and all(nested.values()), nested


def test_status_and_every_audit_view_print_json(ledger_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _populate(ledger_url)
    rows = _json(capsys, "status", "--json")
    assert [r["study_instance_uid"] for r in rows] == [C, B, A]
    for view in ("timeline", "deliveries", "failures", "notifications"):
        assert _json(capsys, "audit", view, "--json") == _json(capsys, "audit", view, "--format", "json"), view
    assert {r["study_instance_uid"] for r in _json(capsys, "audit", "timeline", "--json")} == {A, B, C}
    with pytest.raises(SystemExit) as exc:
        main(["audit", "timeline", "--json", "--format", "csv"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_search_prints_json(ledger_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    upgrade(ledger_url)
    ledger = Ledger(ledger_url)
    e0, e1, e2 = np.eye(8, dtype=np.float32)[:3]
    archive_studies(ledger, {"1.2.3.1": [e0], "1.2.3.2": [e0 + 0.1 * e1], "1.2.3.3": [e2]})
    ledger.close()
    found = _json(capsys, "search", "--like", "1.2.3.1", "--json")
    assert [h["study_instance_uid"] for h in found["hits"]] == ["1.2.3.2", "1.2.3.3"]


@pytest.fixture
def peer() -> Iterator[int]:
    """A C-STORE peer on a free port that stores the first object and refuses the rest (0xA700)."""
    answers = iter([0x0000])
    ae = AE(ae_title="PEER")
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda _event: next(answers, 0xA700))])
    yield port
    server.shutdown()


def test_send_prints_one_json_record_per_file(peer: int, real_cr: Path, ledger_url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["send", "127.0.0.1", str(peer), str(real_cr), str(real_cr), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert exc.value.code == 1 and (report["sent"], report["failed"]) == (1, 1)
    assert [(r["status"], r["ok"]) for r in report["results"]] == [("0x0000", True), ("0xA700", False)]
    assert report["results"][0]["file"] == str(real_cr)


@pytest.fixture
def labelled(nih: Path, tmp_path: Path) -> tuple[Path, Path]:
    """10 Effusion-positive and 20 other NIH images (symlinked) and the NIH labels CSV."""
    with open(nih / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    positive = [r for r in rows if "Effusion" in r["findings"].split("|")][:10]
    images = tmp_path / "images"
    images.mkdir()
    for r in positive + [r for r in rows if "Effusion" not in r["findings"].split("|")][:20]:
        (images / r["image"]).symlink_to(nih / "images" / r["image"])
    return images, nih / "labels.csv"


def test_eval_and_heads_print_json(labelled: tuple[Path, Path], tmp_path: Path, ledger_url: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = labelled
    data = ["--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "out")]
    summary = _json(capsys, "eval", *data, "--json")
    assert summary == json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["findings"]["Effusion"]["n_positive"] == 10
    trained = _json(capsys, "heads", "train", *data, "--finding", "Effusion", "--folds", "3", "--json")
    assert trained["cross_validation"]["n"] == 30 and 0 < trained["operating_point"]["threshold"] < 1
    assert Path(trained["head"]).is_file() and trained["installed_bundle"] is None
    curve = _json(capsys, "heads", "curve", *data, "--finding", "Effusion", "--sizes", "10,all", "--repeats", "2",
                  "--folds", "3", "--json")
    assert curve == json.loads((tmp_path / "out" / "curve-Effusion.json").read_text())


def test_heads_zero_shot_prints_json(ledger_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_aligned_bundle(tmp_path / "var" / "models" / "planted-1")
    report = _json(capsys, "heads", "zero-shot", "--model", "planted-1", "--finding", "Opacity", "--positive",
                   "white blob", "--negative", "plain empty background", "--code", "OPACITY,99PLEURA,Opacity",
                   "--json")
    assert (report["finding"], report["scoring"], report["threshold"]) == ("Opacity", "elixr", 0.5)
    assert report["installed_bundle"]["version"] == "1+zs.Opacity.1"
    assert Path(report["installed_bundle"]["path"]).is_dir()
