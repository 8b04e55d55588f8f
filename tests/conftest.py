"""Shared test settings: offline hub, quiet W&B, and a tiny model config that trains in seconds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# A 8x8 U-Net of ~27k parameters on 240 digits: a round takes milliseconds.
TINY = [
    "data.image_size=8", "data.max_samples=240",
    "model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.attention_head_dim=4",
    "optim.batch_size=4", "optim.lr=1e-3",
    "sample.num_images=4", "sample.steps=2",
    "logging.wandb=false", "logging.progress=false",
]


def tiny(output_dir, *extra):
    """Overrides for a tiny run in ``output_dir``; later items win."""
    return TINY + [f"output_dir={output_dir}"] + list(extra)


def run_cli(args, env=None, timeout=600, torchrun_nproc=None, module="fedrun"):
    """Run ``python -m fedrun ...`` (or under torchrun) in a subprocess; returns CompletedProcess."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE", **(env or {}))
    if torchrun_nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={torchrun_nproc}"]
        cmd += ["-m", module] if not module.endswith(".py") else [module]
    else:
        cmd = [sys.executable] + (["-m", module] if not module.endswith(".py") else [module])
    return subprocess.run(cmd + list(args), cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def tiny_config(tmp_path):
    from fedrun.config import load_config

    def make(*extra, output_dir=None):
        return load_config(None, tiny(output_dir or tmp_path / "run", *extra))

    return make


# A 2-rank job whose rounds last long enough (a few tenths of a second) to be interrupted in the
# middle; the same config run directly with torchrun is the uninterrupted reference of the
# elastic-restart test and of the real-Slurm test (start-up dominates: one launch serves both).
DIGITS_CONFIG = "configs/digits_fedavg.yaml"
FAULT_SHAPE = ["num_clients=2", "rounds=4", "local_steps=40", "checkpoint.every=1",
               "checkpoint.keep_last=4", "sample.every=0"]


@pytest.fixture(scope="session")
def torchrun_reference(tmp_path_factory):
    """Run directory of FAULT_SHAPE trained by ``torchrun --standalone --nproc_per_node=2``."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run_cli(["train", "--config", DIGITS_CONFIG, *tiny(out, *FAULT_SHAPE)], torchrun_nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
