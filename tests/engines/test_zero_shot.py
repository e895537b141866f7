"""Zero-shot heads on a tiny hand-built language-aligned pair.

No language-aligned chest X-ray encoder can be downloaded here, so the image side is built so
that a planted feature (a bright patch) has a known direction ``u`` in the joint space and the
"text" embeddings are placed relative to it: the positive prompt is ``u``, the negative one
lies closer to what background patches look like. Probabilities must then be high for images
with the feature and low without, for both CLIP softmax and ELIXR max-over-tokens scoring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines import load
from engines.importers.dinov2 import vit_manifest
from engines.importers.writer import write_bundle
from engines.zero_shot import ZeroShotHead, prompt_embedding
from tests.engines.aligned_pair import NEGATIVE, NODULE, SCALE, U, architecture, images, planted_model


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _head(scoring: str) -> ZeroShotHead:
    head = ZeroShotHead(1, 4, scoring, SCALE)
    head.positive.copy_(torch.tensor(U[None], dtype=torch.float32))
    head.negative.copy_(torch.tensor(NEGATIVE[None], dtype=torch.float32))
    return head


def test_clip_scoring_is_softmax_over_positive_and_negative() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.3, (2, 4))
    embedding = _unit(np.stack([U + noise[0], -U + noise[1]]))  # with the feature, without
    logits, _ = _head("clip")(torch.tensor(embedding, dtype=torch.float32), torch.zeros(2, 3, 4))
    probabilities = torch.sigmoid(logits)[:, 0].numpy()
    pair = SCALE * np.stack([embedding @ U, embedding @ NEGATIVE], axis=1)
    softmax = np.exp(pair[:, 0]) / np.exp(pair).sum(axis=1)
    np.testing.assert_allclose(probabilities, softmax, atol=1e-5)
    assert probabilities[0] > 0.9 > 0.1 > probabilities[1]


def test_elixr_scoring_is_max_over_tokens() -> None:
    rng = np.random.default_rng(1)
    background = _unit(-U + rng.normal(0, 0.1, (2, 6, 4)))
    patches = background.copy()
    patches[0, 4] = U  # the planted feature in one token of the first image
    logits, token_scores = _head("elixr")(torch.zeros(2, 4), torch.tensor(patches, dtype=torch.float32))
    expected = SCALE * ((patches @ U).max(axis=1) - (patches @ NEGATIVE).max(axis=1))
    np.testing.assert_allclose(logits[:, 0].numpy(), expected, atol=1e-5)
    probabilities = torch.sigmoid(logits)[:, 0].numpy()
    assert probabilities[0] > 0.9 > 0.1 > probabilities[1]
    assert token_scores[0, :, 0].argmax() == 4


def test_prompt_embedding_averages_unit_vectors() -> None:
    np.testing.assert_allclose(prompt_embedding([[2.0, 0.0], [0.0, 5.0]], 2), np.array([1, 1]) / np.sqrt(2), atol=1e-6)
    with pytest.raises(ValueError, match="length 3"):
        prompt_embedding([1.0, 2.0], 3)


def test_planted_feature_through_a_bundle(tmp_path: Path) -> None:
    """ELIXR scoring end to end: export, parity gate, probability and map find the bright patch."""
    spot, background = images()
    manifest = vit_manifest(
        name="planted", version="1", description="hand-built zero-shot test model", licence="test only",
        source={}, architecture=architecture("elixr"), findings=[NODULE], upstream_preprocessing={},
        probabilities="elixr", map_method="patch-token similarity",
    )  # fmt: skip
    out = write_bundle(tmp_path / "planted", model=planted_model(), manifest=manifest, golden_inputs=[spot, background])
    for backend in ("onnxruntime", "torch"):
        result = load(out, backend).infer([spot, background])
        assert result.probabilities[0, 0] > 0.9 > 0.1 > result.probabilities[1, 0]
        assert np.unravel_index(result.maps[0, 0].argmax(), (4, 4)) == (1, 2)
        assert result.maps[0, 0, 1, 2] > 0.9 and result.maps[1, 0].max() < 0.1
