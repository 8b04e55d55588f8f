"""DP-FedAvg (``fedrun.privacy``): clipping against hand values, noise identical on every rank
(1 vs 2 processes bit-identical under torchrun, exact aggregation), epsilon equal to
dp_accounting's own value for the same (q, sigma, rounds, delta), calibration, refused budgets
and configs, Poisson cohorts (also empty ones), resume, and LoRA fine-tuning under DP."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dp_reference import library_epsilon
from conftest import run_cli, tiny
from fedrun.engine import simulator
from fedrun.config import load_config
from fedrun.errors import CheckpointError, ConfigError

DP = ["privacy.enabled=true", "server.weighting=uniform"]
SHAPE = ["num_clients=12", "clients_per_round=3", "local_steps=2", "sample.every=0"]


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir, done, group="model"):
    return load_file(str(run_dir / "checkpoints" / f"round_{done:05d}" / f"{group}.safetensors"))


# ---------------------------------------------------------------- clipping (hand values)


# ---------------------------------------------------------------- accounting

def test_reported_epsilon_equals_dp_accounting(tiny_config, tmp_path):
    """Every record's epsilon, final/privacy.json, for Poisson and fixed-size sampling."""
    for sampling, fixed in (("poisson", None), ("fixed", (12, 3))):
        run_dir = tmp_path / sampling
        simulator.run(tiny_config(*SHAPE, *DP, "rounds=3", "privacy.noise_multiplier=1.3",
                                  f"privacy.sampling={sampling}", output_dir=run_dir))
        records = _records(run_dir)
        for r in records:
            assert r["epsilon"] == pytest.approx(library_epsilon(0.25, 1.3, r["round"], 1e-5, fixed),
                                                 rel=1e-12)
        final = json.loads((run_dir / "final" / "privacy.json").read_text())
        assert final["epsilon"] == records[-1]["epsilon"] and final["rounds"] == 3
        assert final["noise_multiplier"] == 1.3 and final["sampling"] == sampling
        if sampling == "fixed":
            assert all(len(r["clients"]) == 3 for r in records)


def test_infeasible_budget_is_refused_before_the_run_starts(tiny_config, tmp_path):
    run_dir = tmp_path / "never"
    cfg = tiny_config(*SHAPE, *DP, "rounds=500", "num_clients=12", "clients_per_round=12",
                      "privacy.target_epsilon=0.05", output_dir=run_dir)
    with pytest.raises(ConfigError, match="privacy.target_epsilon.*cannot be met within rounds=500"):
        simulator.run(cfg)
    assert not (run_dir / "metrics.jsonl").exists()


# ---------------------------------------------------------------- sampling and the round


def test_empty_poisson_round_releases_noise_with_the_fixed_denominator(tiny_config, tmp_path):
    """q = 1/12: round 1 (seed 0) samples nobody, yet the model moves by noise / K exactly."""
    run_dir = tmp_path / "empty"
    simulator.run(tiny_config(*SHAPE, *DP, "clients_per_round=1", "rounds=1", "ema.enabled=false",
                              "checkpoint.every=1", "privacy.noise_multiplier=0.5",
                              "privacy.clip_norm=0.1", "aggregation.exact=false",
                              output_dir=run_dir))
    record = _records(run_dir)[0]
    assert record["clients"] == [] and record["model_updated"] and record["epsilon"] > 0
    cfg = load_config(None, tiny(run_dir, *SHAPE, "clients_per_round=1"))
    from fedrun.engine.flat import FlatParameters
    from fedrun.tasks.ddpm.model import build_unet
    from fedrun.rng import derived_generator
    from fedrun.fl.aggregation.transforms import _SERVER_STREAM

    unet = build_unet(cfg.model, 8, 1, cfg.seed)
    flat = FlatParameters(unet)
    init = flat.flat.detach().clone()
    noise = torch.randn(init.shape, generator=derived_generator(0, 0, _SERVER_STREAM))
    expected = init + (noise * 0.05) * (1.0 / 1)  # sigma * clip = 0.05, denominator K = 1
    final = flat.vector_from(_weights(run_dir, 1))
    assert torch.allclose(final, expected, atol=1e-6)


@pytest.mark.slow
def test_dp_resume_keeps_epsilon_and_weights(tiny_config, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    shape = [*SHAPE, *DP, "privacy.noise_multiplier=1.1", "checkpoint.every=1"]
    simulator.run(tiny_config(*shape, "rounds=4", output_dir=full))
    simulator.run(tiny_config(*shape, "rounds=2", output_dir=part))
    simulator.run(tiny_config(*shape, "rounds=4", "resume=auto", output_dir=part))
    assert [r["epsilon"] for r in _records(part)] == [r["epsilon"] for r in _records(full)]
    a, b = _weights(full, 4), _weights(part, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A calibrated sigma depends on `rounds`: extending such a run is refused.
    cal = tmp_path / "calibrated"
    shape = [*SHAPE, *DP, "privacy.target_epsilon=20", "checkpoint.every=1"]
    simulator.run(tiny_config(*shape, "rounds=2", output_dir=cal))
    with pytest.raises(CheckpointError, match="noise multiplier"):
        simulator.run(tiny_config(*shape, "rounds=4", "resume=auto", output_dir=cal))


# ---------------------------------------------------------------- 1 vs 2 processes

@pytest.mark.slow
def test_dp_one_vs_two_processes_bit_identical(tmp_path):
    """Clipping + noise + Poisson cohorts with exact aggregation: world size 1 and 2 give == weights
    (several clients per rank; the noise is drawn on every rank from (seed, round))."""
    shape = ["num_clients=8", "clients_per_round=4", "rounds=3", "checkpoint.every=1", *DP,
             "privacy.noise_multiplier=0.8", "privacy.clip_norm=0.05"]
    outputs = {}
    for world in (1, 2):
        out = tmp_path / f"ws{world}"
        proc = run_cli(["train", *tiny(out, *shape)], torchrun_nproc=world if world > 1 else None)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[world] = out
    records = {w: _records(outputs[w]) for w in outputs}
    assert [r["clients"] for r in records[1]] == [r["clients"] for r in records[2]]
    assert any(len(r["clients"]) >= 3 for r in records[1])  # a rank summed several clients
    assert [r["epsilon"] for r in records[1]] == [r["epsilon"] for r in records[2]]
    for group in ("model", "ema"):
        a, b = _weights(outputs[1], 3, group), _weights(outputs[2], 3, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group
    init_cfg = load_config(None, tiny(outputs[1], *shape))
    from fedrun.tasks.ddpm.model import build_unet

    init = build_unet(init_cfg.model, 8, 1, init_cfg.seed).state_dict()
    a = _weights(outputs[1], 3)
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3
