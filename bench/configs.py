"""The model/data settings each benchmark runs (full and ``--quick``), as fedrun config overrides."""

from __future__ import annotations

from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "configs" / "digits_fedavg.yaml")  # 16x16 U-Net (32, 64), ~0.7 M params
CELEBA = str(REPO / "configs" / "celeba_fedavg.yaml")  # the paper's 64x64 U-Net, ~25 M params

# The test suite's 8x8 U-Net of ~27 k parameters (tests/conftest.py TINY, without the data cap).
TINY_MODEL = ["data.image_size=8", "model.block_out_channels=[8,16]", "model.norm_num_groups=4",
              "model.attention_head_dim=4", "optim.batch_size=4", "sample.num_images=4",
              "sample.steps=2"]

# No W&B, no progress bar, one thread per rank (CPU), a run directory that may be reused.
QUIET = ["logging.wandb=false", "logging.progress=false", "threads=1", "overwrite=true"]


def overrides(output_dir: Path, quick: bool, *extra: str) -> List[str]:
    return QUIET + (TINY_MODEL if quick else []) + [f"output_dir={output_dir}"] + list(extra)


def load(output_dir: Path, quick: bool, *extra: str, path: str = DIGITS):
    from fedrun.config import load_config

    return load_config(path, overrides(output_dir, quick, *extra))
