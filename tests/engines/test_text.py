"""The text side of language-aligned bundles and zero-shot findings added from prompts.

Uses the real all-MiniLM-L6-v2 sentence encoder and the hand-built pair of
:mod:`tests.engines.aligned_pair`. The prompts below are not the anchors the projection was
fitted on, so they land on the right side only through the sentence encoder itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import BundleError, load, load_bundle
from engines.importers.zero_shot_finding import add_finding
from engines.pins import pin
from engines.text import NoTextEncoder, text_encoder
from engines.zero_shot import prompt_embedding
from tests.engines.aligned_pair import NEGATIVE, SCALE, U, images, write_aligned_bundle
from tests.figures import save

POSITIVE = ["a small bright mass", "white blob"]
ABSENT = ["plain empty background", "dark uniform field"]
OPACITY = {"name": "Opacity", "code": {"value": "OPACITY", "scheme": "99PLEURA", "meaning": "Opacity (test code)"},
           "threshold": 0.5}


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("aligned")
    return {scoring: write_aligned_bundle(root / scoring, scoring) for scoring in ("elixr", "clip")}


def test_prompts_that_are_not_anchors_land_on_their_side(aligned: dict[str, Path]) -> None:
    encoder = text_encoder(load_bundle(aligned["elixr"]))
    vectors = encoder.encode(POSITIVE + ABSENT)
    assert vectors.shape == (4, 4) and np.linalg.norm(vectors, axis=1) == pytest.approx([1.0] * 4, abs=1e-5)
    cos_u, cos_negative = vectors @ U, vectors @ NEGATIVE
    save("text_side", {"prompts": POSITIVE + ABSENT, "cos_U": cos_u.round(3).tolist(),
                       "cos_NEGATIVE": cos_negative.round(3).tolist()})
    assert np.all(cos_u[:2] > 0.8) and np.all(cos_u[2:] < 0)
    assert np.all(cos_negative[2:] > 0.8) and np.all(cos_negative[:2] < 0)
    with pytest.raises(ValueError, match="non-empty"):
        encoder.encode(["  "])


def test_elixr_zero_shot_finding_finds_the_spot_on_both_backends(aligned: dict[str, Path], tmp_path: Path) -> None:
    base = load_bundle(aligned["elixr"])
    out = add_finding(base, tmp_path / "zs", finding=OPACITY, positive=POSITIVE, negative=ABSENT, version="1+zs")
    bundle = load_bundle(out)
    assert [f.name for f in bundle.findings] == ["Nodule", "Opacity"] and bundle.version == "1+zs"
    spec = bundle.manifest["findings"][1]
    assert spec["prompts"] == {"positive": POSITIVE, "negative": ABSENT}
    assert bundle.manifest["derived_from"]["model_sha256"] == base.model_sha256
    assert bundle.manifest["text_encoder"] == base.manifest["text_encoder"]
    spot, background = images()
    for backend in ("onnxruntime", "torch"):
        result = load(out, backend).infer([spot, background])
        save(f"zero_shot_elixr_{backend}", {"opacity_spot_background": result.probabilities[:, 1].tolist()})
        assert result.probabilities[0, 1] > 0.8 > 0.1 > result.probabilities[1, 1]
        assert np.unravel_index(result.maps[0, 1].argmax(), (4, 4)) == (1, 2)
        np.testing.assert_allclose(result.probabilities[:, 0], load(base.path, backend).infer(
            [spot, background]).probabilities[:, 0], atol=1e-5)  # Nodule unchanged
    # Re-prompting an existing finding replaces its row: swapped prompts turn the spot negative.
    swapped = add_finding(bundle, tmp_path / "swapped", finding=OPACITY, positive=ABSENT, negative=POSITIVE,
                          version="1+zs.2")
    result = load(swapped, "onnxruntime").infer([spot, background])
    assert [f.name for f in load_bundle(swapped).findings] == ["Nodule", "Opacity"]
    assert result.probabilities[0, 1] < 0.1


def test_clip_zero_shot_finding_is_scored_as_the_bundle_declares(aligned: dict[str, Path], tmp_path: Path) -> None:
    base = load_bundle(aligned["clip"])
    out = add_finding(base, tmp_path / "zs", finding=OPACITY, positive=POSITIVE, negative=ABSENT, version="1+zs")
    assert json.loads((out / "manifest.json").read_text())["architecture"]["scoring"] == "clip"
    encoder = text_encoder(base)
    positive, negative = (prompt_embedding(encoder.encode(texts), 4) for texts in (POSITIVE, ABSENT))
    state = torch.load(out / "weights.pt", weights_only=True)
    np.testing.assert_allclose(state["head.positive"][1].numpy(), positive, atol=1e-6)
    np.testing.assert_allclose(state["head.negative"][1].numpy(), negative, atol=1e-6)
    result = load(out, "onnxruntime").infer(list(images()))
    expected = 1 / (1 + np.exp(-SCALE * (result.embeddings @ (positive - negative))))
    np.testing.assert_allclose(result.probabilities[:, 1], expected, atol=1e-4)


def test_bundles_without_a_usable_text_side_are_refused(aligned: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(NoTextEncoder, match="demo 0.1.0 has no text encoder"):
        text_encoder(load_bundle("demo"))
    with pytest.raises(BundleError, match="cam_cnn model: zero-shot findings need"):
        add_finding(load_bundle("demo"), tmp_path / "x", finding=OPACITY, positive=POSITIVE, negative=ABSENT,
                    version="2")
    broken = tmp_path / "broken"
    shutil.copytree(aligned["elixr"], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["text_encoder"]["kind"] = "bert-of-theseus"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NoTextEncoder, match="'bert-of-theseus', which this Pleura cannot run"):
        text_encoder(load_bundle(broken))
    manifest["text_encoder"]["kind"] = "all-minilm-l6-v2"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    np.save(broken / "text_projection.npy", np.zeros((4, 10), np.float32))
    pin(broken)
    with pytest.raises(BundleError, match=r"shape \(4, 10\); expected finite \(4, 384\)"):
        text_encoder(load_bundle(broken))
