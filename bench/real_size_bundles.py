"""Random-weight bundles of real size, made through the importers, for CPU time-to-result runs.

    .venv/bin/python -m bench.real_size_bundles --out /tmp/pleura-models

- ``densenet121``: a torchxrayvision ``densenet121-res224-all``-shaped state dict (DenseNet-121,
  18 outputs, ``op_threshs``), seeded random weights, imported with
  ``pleura models import torchxrayvision``;
- ``vitb14-518``: a DINOv2 ViT-B/14 at 518 x 518 (RAD-DINO's shape: 768 wide, 12 layers, 12 heads)
  in ``transformers``' ``save_pretrained`` format with a two-finding heads file, imported with
  ``pleura models import dinov2``.

Weights are random, so findings mean nothing; what is measured is what such a model costs. The
bundles then serve ``bench.completion --model NAME --models-dir DIR``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engines.nets.densenet import DenseNet

PLEURA = str(Path(sys.executable).with_name("pleura"))
DINO_SIZE = 518


def densenet121_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    model = DenseNet(num_findings=18, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4)
    torch.save({**model.state_dict(), "op_threshs": torch.linspace(0.05, 0.5, 18)}, path)


def dinov2_checkpoint(directory: Path) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, patch_size=14,
                                       image_size=DINO_SIZE)
    transformers.Dinov2Model(config).eval().save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": True, "crop_size": {"height": DINO_SIZE, "width": DINO_SIZE},
        "size": {"shortest_edge": DINO_SIZE}, "image_mean": [0.53, 0.53, 0.53], "image_std": [0.26, 0.26, 0.26]}))
    rng = np.random.default_rng(0)
    np.savez(directory / "heads.npz", names=np.array(["Effusion", "Cardiomegaly"]),
             weights=rng.normal(0, 0.03, (2, 768)).astype(np.float32), bias=np.array([0.0, 0.0], np.float32),
             thresholds=np.array([0.5, 0.5]), code_values=np.array(["60046008", "8186001"]),
             code_schemes=np.array(["SCT", "SCT"]), code_meanings=np.array(["Pleural effusion", "Cardiomegaly"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="models directory (PLEURA_MODELS_DIR)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pleura-real-size-") as scratch:
        sources = {"densenet121": ("torchxrayvision", Path(scratch) / "densenet121.pt"),
                   "vitb14-518": ("dinov2", Path(scratch) / "vitb14")}
        densenet121_checkpoint(sources["densenet121"][1])
        sources["vitb14-518"][1].mkdir()
        dinov2_checkpoint(sources["vitb14-518"][1])
        for name, (kind, source) in sources.items():
            started = time.monotonic()
            options = ["--option", f"heads={source / 'heads.npz'}"] if kind == "dinov2" else []
            subprocess.run([PLEURA, "models", "import", kind, str(source), "--name", name, "--version", "random-1",
                            "--out", str(args.out / name), *options], check=True)
            print(f"{name}: imported in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
