"""``fedrun audit``: a tiny model overfit on 8 images is flagged (membership-inference AUC near 1,
samples that sit on training images), a barely trained one is not (AUC near 0.5, distance
ratios near 1); fine-tuning runs are audited against a --heldout folder of the same class."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny
from fedrun.engine import simulator
from fedrun.eval.audit import AuditOptions, audit_run
from fedrun.config import load_config
from fedrun.errors import ConfigError

# 8 training and 8 held-out digits, one client, 1,000 steps of batch 8: far past generalising
# (about 30 s on an idle core). A federation of 2 clients needs several times more steps to
# memorise as visibly, so the positive control trains one client.
OVERFIT = ["data.max_samples=16", "data.heldout_fraction=0.5", "optim.batch_size=8",
           "optim.lr=1e-2", "num_clients=1", "rounds=10", "local_steps=100", "ema.enabled=false",
           "sample.every=0"]
FRESH = ["data.max_samples=200", "data.heldout_fraction=0.5", "num_clients=2", "rounds=1",
         "local_steps=1", "sample.every=0"]


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("audit") / "overfit"
    simulator.run(load_config(None, tiny(run_dir, *OVERFIT)))
    return run_dir


@pytest.mark.slow
def test_audit_flags_a_model_overfit_on_8_images(overfit_run):
    said = []
    record = audit_run(overfit_run, AuditOptions(num_samples=64, noise_draws=4), say=said.append)
    mia = record["membership_inference"]
    assert mia["members"] == 8 and mia["nonmembers"] == 8
    assert mia["auc"] >= 0.9 and mia["mean_loss_members"] < mia["mean_loss_nonmembers"]
    assert mia["auc_ci95"][0] <= mia["auc"] <= mia["auc_ci95"][1]
    assert mia["tpr_at_1pct_fpr_reliable"] is False and mia["fpr_reached"] == 0.0
    assert "TPR at 1 % FPR unreliable (8 non-members < 100)" in said[-1], said[-1]
    assert record["pixel"]["median_ratio"] < 0.7, record["pixel"]
    assert record["pixel"]["fraction_below"]["0.8"] > 0.6
    assert record["feature"]["median_ratio"] < 0.7, record["feature"]
    memorised = record["memorised"]
    assert memorised["samples"] > 0 and set(memorised["by_client"]) == {"0"}
    assert sum(memorised["by_client"].values()) == memorised["samples"]
    for name in ("audit.json", "closest_pairs.png", "ratios.png", "mia_roc.png"):
        assert (overfit_run / "audit" / name).is_file(), name
    assert json.loads((overfit_run / "audit" / "audit.json").read_text())["num_samples"] == 64


def test_audit_does_not_flag_a_fresh_model(tmp_path):
    from fedrun.cli import main

    run_dir = tmp_path / "fresh"
    simulator.run(load_config(None, tiny(run_dir, *FRESH)))
    assert main(["audit", "--run", str(run_dir), "--num-samples", "64", "--noise-draws", "1"]) == 0
    record = json.loads((run_dir / "audit" / "audit.json").read_text())
    mia = record["membership_inference"]
    assert mia["members"] == 100 and mia["nonmembers"] == 100
    assert 0.35 < mia["auc"] < 0.65, mia
    assert record["pixel"]["median_ratio"] > 0.85 and record["pixel"]["fraction_below"]["0.5"] == 0.0
    assert record["memorised"]["samples"] == 0


def test_finetune_audit_needs_heldout_and_runs_with_it(tmp_path):
    from PIL import Image

    from fedrun.config import DataConfig
    from fedrun.data import build_datasets
    from fedrun.tasks.sd_lora.tiny_sd import build_tiny_pipeline
    from test_finetune import finetune_overrides

    pipeline = build_tiny_pipeline(tmp_path / "tiny_sd", block_out_channels=(16, 32), image_size=8)
    data, _ = build_datasets(DataConfig(image_size=8, heldout_fraction=0.0), 0)
    nines = np.flatnonzero(data.labels == 9)
    for folder, chosen in (("subject", nines[:8]), ("heldout", nines[8:16])):
        (tmp_path / folder).mkdir()
        for i in chosen:
            pixels = ((data.get_batch([i])[0, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy(), mode="L").save(tmp_path / folder / f"nine_{i}.png")
    run_dir = tmp_path / "lora"
    simulator_cfg = load_config(None, finetune_overrides(pipeline, tmp_path / "subject", run_dir,
                                                         "finetune.aggregation_error_every=0"))
    from fedrun.tasks.sd_lora.task import FinetuneTask

    simulator.run(simulator_cfg, FinetuneTask(simulator_cfg))
    with pytest.raises(ConfigError, match="--heldout"):
        audit_run(run_dir, AuditOptions(num_samples=4))
    record = audit_run(run_dir, AuditOptions(num_samples=8, noise_draws=1,
                                             heldout=str(tmp_path / "heldout")))
    assert record["task"] == "sd_lora"
    assert record["membership_inference"]["members"] == 8
    assert record["membership_inference"]["nonmembers"] == 8
    assert 0.0 <= record["pixel"]["median_ratio"] and record["num_samples"] == 8


# ---------------------------------------------------------------- membership-inference statistics
# mia_statistics is pure (scores in, dict out); scores are "higher = member" (the audit uses -loss).


