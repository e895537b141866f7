"""Import a torchxrayvision DenseNet-121 checkpoint (e.g. ``densenet121-res224-all``) as a bundle.

What torchxrayvision does, and how the bundle says it:

- preprocessing: ``xrv.datasets.normalize(img, maxval)`` maps [0, maxval] onto [-1024, 1024];
  Pleura's input is already ``img / maxval`` in [0, 1], so this is normalization scheme
  ``range`` [-1024, 1024]. ``XRayCenterCrop`` + ``XRayResizer(224)`` is resize policy
  ``center_crop`` at 224x224 (Pleura's antialiased tent filter, not skimage's resampler).
- outputs: ``sigmoid(classifier(features2(x)))`` for their 18 pathology names; outputs with an
  empty name (or no operating threshold) are dropped.
- calibration: torchxrayvision's ``op_norm`` maps a probability ``p`` so that the output's
  ``op_threshs`` value lands on 0.5. The bundle keeps raw probabilities and records each
  ``op_thresh`` as the finding's operating threshold, so Positive = ``p >= op_thresh``, which is
  exactly ``op_norm(p) >= 0.5``.
- embedding: the global average of ``relu(features(x))`` (1024-d for DenseNet-121); CAM: that
  feature map times the imported classifier's weights plus its bias (the classifier becomes the
  bundle's head).

Accepted files: a state dict saved with ``torch.save(model.state_dict(), path)`` (read with
``weights_only=True``), which may carry the ``op_threshs`` buffer. torchxrayvision's own
download is a pickled whole model; reading it can run code from the file, so it is refused
unless ``allow_pickle=True`` is passed. Then its torchxrayvision/torchvision classes are
replaced by a plain module while unpickling (neither library is needed) and only the state
dict is kept. If the file carries no thresholds (torchxrayvision sets them from its
``model_urls`` table after loading), pass them as ``op_threshs``.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import re
import types
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from engines.bundle import SCHEMA_VERSION
from engines.importers.writer import ADULT_FRONTAL_CHEST, write_bundle
from engines.nets.densenet import DenseNet

#: torchxrayvision's output order for the ``densenet121-res224-all`` weights.
PATHOLOGIES = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)

#: SNOMED CT concepts (value, meaning) used where the mapping of the label is unambiguous.
SNOMED = {
    "Atelectasis": ("46621007", "Atelectasis"),
    "Consolidation": ("95436008", "Lung consolidation"),
    "Infiltration": ("409609008", "Radiologic infiltrate of lung"),
    "Pneumothorax": ("36118008", "Pneumothorax"),
    "Edema": ("19242006", "Pulmonary edema"),
    "Emphysema": ("87433001", "Pulmonary emphysema"),
    "Fibrosis": ("51615001", "Fibrosis of lung"),
    "Effusion": ("60046008", "Pleural effusion"),
    "Pneumonia": ("233604007", "Pneumonia"),
    "Cardiomegaly": ("8186001", "Cardiomegaly"),
}
#: Coding scheme designator of Pleura-local codes for labels without a SNOMED CT concept here.
LOCAL_SCHEME = "99PLEURA"

SIZE = 224
TOLERANCE = {"fp32": {"embeddings": 1e-3, "probabilities": 1e-4, "maps": 1e-4}}

_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


class _UpstreamModule(torch.nn.Module):
    """Stands in for a torchxrayvision or torchvision class while unpickling: only its tensors are kept."""


class _StandInUnpickler(pickle.Unpickler):
    """Unpickles torchxrayvision's whole-model files without importing torchxrayvision or torchvision."""

    def find_class(self, module: str, name: str) -> Any:
        if module.partition(".")[0] in ("torchxrayvision", "torchvision"):
            return _UpstreamModule
        return super().find_class(module, name)


_STAND_IN_PICKLE = types.ModuleType("pleura_xrv_pickle")
_STAND_IN_PICKLE.Unpickler = _StandInUnpickler  # type: ignore[attr-defined]
_STAND_IN_PICKLE.load = pickle.load  # type: ignore[attr-defined]


def read_state_dict(path: Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a torchxrayvision checkpoint: a state dict, or a whole pickled model.

    Raises ValueError naming the file when it cannot be read (safely) as either.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc):  # weights-only refused a byte, not a class: the file is damaged
            raise ValueError(f"{path}: not a readable PyTorch checkpoint (corrupt or another format)") from exc
        if not allow_pickle:
            raise ValueError(
                f"{path}: not a plain state dict (it holds pickled objects, e.g. torchxrayvision's whole-model "
                "download). Loading it would run code from the file: re-run with allow_pickle=True only if you "
                "trust its source, or convert it where torchxrayvision is installed with "
                "torch.save(xrv.models.DenseNet(weights=...).state_dict(), 'densenet.pt')"
            ) from exc
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SourceChangeWarning: the stand-in's source is not upstream's
                obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_STAND_IN_PICKLE)
        except (ModuleNotFoundError, AttributeError) as missing:
            raise ValueError(
                f"{path}: unpickling it needs code that is not installed ({missing}); convert it to a state dict "
                "where torchxrayvision is installed (see the engines.importers.xrv docstring)"
            ) from missing
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if isinstance(obj, torch.nn.Module):
        thresholds = getattr(obj, "op_threshs", None)  # a plain attribute when set after loading
        obj = obj.state_dict()
        if isinstance(thresholds, torch.Tensor):
            obj.setdefault("op_threshs", thresholds)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (names -> tensors) or a model, got {type(obj).__name__}")
    return {_LEGACY_KEY.sub(r"\1\2", k.removeprefix("module.")): v for k, v in obj.items()}


def architecture(state: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """The manifest ``architecture`` of the DenseNet-BC a state dict belongs to (DenseNet-121 for xrv's)."""
    try:
        blocks: list[int] = []
        while f"features.denseblock{len(blocks) + 1}.denselayer1.conv1.weight" in state:
            prefix = f"features.denseblock{len(blocks) + 1}.denselayer"
            blocks.append(sum(1 for k in state if k.startswith(prefix) and k.endswith(".conv1.weight")))
        conv1 = state["features.denseblock1.denselayer1.conv1.weight"]
        growth_rate = int(state["features.denseblock1.denselayer1.conv2.weight"].shape[0])
        return {
            "name": "densenet",
            "growth_rate": growth_rate,
            "block_config": blocks,
            "num_init_features": int(state["features.conv0.weight"].shape[0]),
            "bn_size": int(conv1.shape[0]) // growth_rate,
        }
    except KeyError as exc:
        raise ValueError(f"{where}: no {exc.args[0]}; not a torchxrayvision DenseNet checkpoint") from exc


def load_upstream(state: dict[str, torch.Tensor], where: Path) -> DenseNet:
    """The DenseNet holding ``state`` (without ``op_threshs``), all outputs kept."""
    if "classifier.weight" not in state:
        raise ValueError(f"{where}: no classifier.weight; not a torchxrayvision DenseNet checkpoint")
    model = DenseNet(num_findings=state["classifier.weight"].shape[0], **_params(architecture(state, where)))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{where}: not a 1-channel DenseNet state dict as torchxrayvision saves it: "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
            f"{len(wrong)} with other shapes {wrong[:3]}"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()


def import_bundle(
    source: Path,
    out: Path,
    *,
    name: str,
    version: str,
    progress: Callable[[str], None] | None = None,
    weights: str = "densenet121-res224-all",
    pathologies: Sequence[str] = PATHOLOGIES,
    op_threshs: Sequence[float] | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Write the torchxrayvision checkpoint ``source`` as bundle ``out``; returns ``out``.

    ``pathologies`` are the checkpoint's output names in order ("" for unused outputs);
    ``op_threshs`` override (or supply, if the file has none) the operating thresholds.
    """
    say = progress or (lambda _message: None)
    say(f"reading {source}")
    state = read_state_dict(source, allow_pickle=allow_pickle)
    stored = state.pop("op_threshs", None)
    upstream = load_upstream(state, source)
    n_out = upstream.classifier.out_features
    if len(pathologies) != n_out:
        raise ValueError(f"{source}: the classifier has {n_out} outputs but {len(pathologies)} pathology names")
    thresholds = _thresholds(op_threshs if op_threshs is not None else stored, n_out, source)
    keep = [i for i, (n, t) in enumerate(zip(pathologies, thresholds, strict=True)) if n and math.isfinite(t)]
    dropped = [n for n, t in zip(pathologies, thresholds, strict=True) if n and not math.isfinite(t)]
    arch = architecture(state, source)
    model = DenseNet(num_findings=len(keep), **_params(arch))
    head = upstream.state_dict()
    head["classifier.weight"] = head["classifier.weight"][keep]
    head["classifier.bias"] = head["classifier.bias"][keep]
    model.load_state_dict(head)
    say(f"{len(keep)} findings kept of {n_out} outputs" + (f"; dropped (no threshold): {dropped}" if dropped else ""))
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    findings = [_finding(pathologies[i], thresholds[i]) for i in keep]
    return write_bundle(
        out,
        model=model.eval(),
        manifest=_manifest(name, version, weights, source, digest, arch, model.num_features, findings),
        progress=say,
    )


def _thresholds(values: Sequence[float] | torch.Tensor | None, n_out: int, source: Path) -> list[float]:
    """``n_out`` operating thresholds, each in (0, 1) or NaN (output without one)."""
    if values is None:
        raise ValueError(
            f"{source}: carries no op_threshs (operating thresholds); pass op_threshs= with torchxrayvision's "
            "values for these weights"
        )
    thresholds = [float(t) for t in values]
    if len(thresholds) != n_out:
        raise ValueError(f"{source}: {len(thresholds)} op_threshs for {n_out} outputs")
    if any(math.isfinite(t) and not 0.0 < t < 1.0 for t in thresholds):
        raise ValueError(f"{source}: op_threshs must be probabilities in (0, 1) or NaN, got {thresholds}")
    return thresholds


def _params(arch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in arch.items() if k != "name"}


def _finding(label: str, threshold: float) -> dict[str, Any]:
    value, meaning = SNOMED.get(label, ("XRV-" + label.upper().replace(" ", "_"), label.replace("_", " ")))
    return {
        "name": label,
        "code": {"value": value, "scheme": "SCT" if label in SNOMED else LOCAL_SCHEME, "meaning": meaning},
        "threshold": threshold,
        "threshold_rule": "torchxrayvision op_thresh: Positive = p >= threshold, i.e. op_norm(p) >= 0.5",
        "label_source": f"torchxrayvision output {label!r}",
    }


def _manifest(
    name: str,
    version: str,
    weights: str,
    source: Path,
    digest: str,
    arch: dict[str, Any],
    embedding_dim: int,
    findings: list[dict[str, Any]],
) -> dict[str, Any]:
    local = [f["name"] for f in findings if f["code"]["scheme"] == LOCAL_SCHEME]
    return {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "description": (
            f"torchxrayvision DenseNet-121 ({weights}) imported unchanged: {len(findings)} finding probabilities, "
            f"a {embedding_dim}-d embedding and class activation maps. Research model; see MODEL_CARD.md."
        ),
        "licence": (
            "torchxrayvision code Apache-2.0; the weights were trained on public chest X-ray datasets whose own "
            "terms (several research-use only) may restrict use: check them upstream before any deployment"
        ),
        "source": {
            "upstream": f"torchxrayvision (github.com/mlmed/torchxrayvision), DenseNet weights {weights!r}",
            "file": Path(source).name,
            "file_sha256": digest,
            "attribution": (
                "Cohen JP, Viviano JD, Bertin P, et al. TorchXRayVision: A library of chest X-ray datasets and "
                "models. MIDL 2022."
            ),
            "built_by": f"pleura models import torchxrayvision {Path(source).name} --name {name} --version {version}",
        },
        "intended_use": dict(ADULT_FRONTAL_CHEST),
        "input": {
            "size": [SIZE, SIZE],
            "channels": 1,
            "photometric_interpretation": "MONOCHROME2",
            "pixel_range": [0.0, 1.0],
            "resize": {
                "policy": "center_crop",
                "filter": "separable antialiased tent filter (bilinear when enlarging)",
                "description": (
                    "As torchxrayvision's XRayCenterCrop then XRayResizer(224): the largest centred square is cut "
                    "and scaled to 224x224. Resampling is Pleura's, not skimage.transform.resize, so pixels differ "
                    "slightly from torchxrayvision's."
                ),
            },
            "normalization": {
                "scheme": "range",
                "low": -1024.0,
                "high": 1024.0,
                "description": "xrv.datasets.normalize(img, maxval): [0, maxval] -> [-1024, 1024]",
            },
        },
        "architecture": arch,
        "outputs": {
            "embedding_dim": embedding_dim,
            "probabilities": "sigmoid of the imported classifier's logits (raw, before torchxrayvision's op_norm)",
            "map": {
                "method": "CAM (relu of the final DenseNet features x classifier weights + bias)",
                "feature_stride": DenseNet.stride,
                "size": [32, 32],
                "description": (
                    "Per finding, sigmoid of the local logit sampled over the original image's extent; outside "
                    "the centre crop (unseen by the model) the nearest edge of the 7x7 grid is repeated."
                ),
            },
        },
        "findings": findings,
        "parity": {
            "tolerance": TOLERANCE,
            "description": "Max absolute difference from golden.npz per output; fp32 only (fp16 not validated).",
        },
        "notes": [
            "Calibration: probabilities are raw sigmoid outputs; each finding's operating threshold is "
            "torchxrayvision's op_thresh, so Positive = p >= threshold, equivalent to op_norm(p) >= 0.5.",
            "Codes: SNOMED CT (SCT) concepts for "
            + ", ".join(f["name"] for f in findings if f["code"]["scheme"] == "SCT")
            + " (not checked against a SNOMED CT release here)"
            + (f"; Pleura-local codes (scheme {LOCAL_SCHEME}) for {', '.join(local)}." if local else "."),
            "Intended use (views, adult age) is Pleura's reading of the training data, not a claim by the authors.",
        ],
    }
