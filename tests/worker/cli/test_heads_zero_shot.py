"""`pleura heads zero-shot` installs a prompted finding; `pleura search --text` queries the archive.

Runs the CLI in-process on a SQLite ledger with the hand-built language-aligned bundle of
:mod:`tests.engines.aligned_pair` (real all-MiniLM-L6-v2 text side). The archive's vectors are
placed near the bright-spot direction U or the empty-image direction NEGATIVE, so the right
ranking is known; the query texts are not the projection's anchors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines import load
from tests.engines.aligned_pair import NEGATIVE, U, images, write_aligned_bundle
from tests.figures import save
from tests.worker.archived import archive_studies
from worker.bundles.catalogue import bundle
from worker.cli import main
from worker.ledger.db import Ledger
from worker.settings import load_settings

ZS = ["heads", "zero-shot", "--model", "planted-1", "--finding", "Opacity", "--positive", "a small bright mass",
      "--positive", "white blob", "--negative", "plain empty background"]
CODE = ["--code", "OPACITY,99PLEURA,Opacity (test code)"]


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PLEURA_DATA_DIR", str(tmp_path / "var"))
    write_aligned_bundle(tmp_path / "var" / "models" / "planted-1")
    return tmp_path / "var"


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return str(exc.value.code) + capsys.readouterr().err


def test_zero_shot_installs_a_new_version_that_finds_the_spot(data_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert "give its SR code with --code" in _fails(ZS, capsys)
    assert "threshold must be a probability" in _fails([*ZS, *CODE, "--threshold", "1.5"], capsys)
    assert "demo 0.1.0 is a cam_cnn model: zero-shot findings need" in _fails([*ZS, *CODE, "--model", "demo"],
                                                                               capsys)
    main([*ZS, *CODE])
    out = capsys.readouterr().out
    save("zero_shot_cli", {"output": out})
    assert "Opacity: zero-shot (elixr scoring) from 2 positive and 1 negative prompt(s), threshold 0.5" in out
    assert "installed bundle version 1+zs.Opacity.1" in out
    installed = bundle(load_settings(None), "planted-1_zs.Opacity.1")
    assert [f.name for f in installed.findings] == ["Nodule", "Opacity"]
    assert installed.findings[1].code_scheme == "99PLEURA"
    result = load(installed, "onnxruntime").infer(list(images()))
    assert result.probabilities[0, 1] > 0.8 > 0.1 > result.probabilities[1, 1]
    main([*ZS, "--finding", "Nodule", "--threshold", "0.7"])  # re-prompts a finding it has: code kept
    assert "installed bundle version 1+zs.Nodule.1" in capsys.readouterr().out
    nodule = bundle(load_settings(None), "planted-1_zs.Nodule.1")
    assert [(f.name, f.code_value, f.threshold) for f in nodule.findings] == [("Nodule", "27925004", 0.7)]
    assert not list((data_dir / "models").glob(".*.tmp"))


def test_search_by_text_ranks_the_matching_studies_first(data_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    main(["db", "upgrade"])
    rng = np.random.default_rng(0)
    studies = {f"1.2.{n}": direction + rng.normal(0, 0.1, 4)
               for n, direction in enumerate([U, NEGATIVE, U, NEGATIVE, U])}
    ledger = Ledger(f"sqlite:///{data_dir / 'pleura.db'}")
    archive_studies(ledger, {uid: [v] for uid, v in studies.items()}, ("planted", "1"))
    ledger.close()
    capsys.readouterr()
    ranked = {}
    for text in ("a bright spot in the lung", "an empty picture"):
        main(["search", "--text", text, "--bundle", "planted-1", "--json", "--limit", "5"])
        hits = json.loads(capsys.readouterr().out)["hits"]
        ranked[text] = [(h["study_instance_uid"], round(h["score"], 3)) for h in hits]
    save("search_text", {"ranked": ranked})
    assert {uid for uid, _ in ranked["a bright spot in the lung"][:3]} == {"1.2.0", "1.2.2", "1.2.4"}
    assert min(score for _, score in ranked["a bright spot in the lung"][:3]) > 0.8
    assert {uid for uid, _ in ranked["an empty picture"][:2]} == {"1.2.1", "1.2.3"}
    main(["search", "--text", "a bright spot", "--bundle", "planted-1", "--limit", "2", "--offset", "2"])
    page = capsys.readouterr().out
    assert "results 3-4" in page and "backend exact: sqlite" in page
    assert "demo 0.1.0 has no text encoder" in _fails(["search", "--text", "a bright spot", "--bundle", "demo"],
                                                      capsys)
