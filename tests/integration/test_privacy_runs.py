"""DP-FedAvg (``fedrun.privacy``): clipping against hand values, noise identical on every rank
(1 vs 2 processes bit-identical under torchrun, exact aggregation), epsilon equal to
dp_accounting's own value for the same (q, sigma, rounds, delta) under RDP and PLD, calibration,
refused budgets and configs, Poisson cohorts (also empty ones), resume, adaptive clipping (its
clip trajectory recomputed from the records, resumed, on 2 processes) and the pre-flight check."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dp_reference import library_epsilon, library_pld_epsilon
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

def _initial_weights(run_dir, *shape):
    from fedrun.engine.flat import FlatParameters
    from fedrun.tasks.ddpm.model import build_unet

    cfg = load_config(None, tiny(run_dir, *shape))
    return FlatParameters(build_unet(cfg.model, 8, 1, cfg.seed)).flat.detach().clone()


def test_reported_epsilon_equals_dp_accounting(tiny_config, tmp_path, capsys):
    """Every record's epsilon (the configured accountant's) and final/privacy.json (both
    accountants' where both apply), for Poisson and fixed-size sampling, RDP and PLD; the
    pre-flight check printed before round 1 and stored in privacy.json."""
    for sampling, accountant, fixed in (("poisson", "rdp", None), ("fixed", "rdp", (12, 3)),
                                        ("poisson", "pld", None)):
        run_dir = tmp_path / f"{sampling}_{accountant}"
        simulator.run(tiny_config(*SHAPE, *DP, "rounds=3", "privacy.noise_multiplier=1.3",
                                  f"privacy.sampling={sampling}", f"privacy.accountant={accountant}",
                                  output_dir=run_dir))
        records = _records(run_dir)
        rdp = [library_epsilon(0.25, 1.3, r, 1e-5, fixed) for r in (1, 2, 3)]
        pld = [library_pld_epsilon(0.25, 1.3, r, 1e-5) for r in (1, 2, 3)] if not fixed else None
        assert [r["epsilon"] for r in records] == pytest.approx(pld if accountant == "pld" else rdp,
                                                                rel=1e-12)
        final = json.loads((run_dir / "final" / "privacy.json").read_text())
        assert final["epsilon"] == records[-1]["epsilon"] and final["rounds"] == 3
        assert final["epsilon_rdp"] == pytest.approx(rdp[-1], rel=1e-12)
        assert final["epsilon_pld"] == (None if fixed else pytest.approx(pld[-1], rel=1e-12))
        assert final["noise_multiplier"] == 1.3 and final["sampling"] == sampling
        if sampling == "fixed":
            assert all(len(r["clients"]) == 3 for r in records)
        # pre-flight: 1.3 * 1 / 3 per coordinate, x sqrt(3) over the run, against the initial RMS
        init = _initial_weights(run_dir, *SHAPE)
        rms = float(init.double().pow(2).mean().sqrt())
        check = final["preflight"]
        assert check["weights_rms"] == pytest.approx(rms, rel=1e-12)
        assert check["noise_per_coordinate"] == pytest.approx(1.3 / 3, rel=1e-15)
        assert check["noise_walk"] == pytest.approx(1.3 / 3 * math.sqrt(3), rel=1e-15)
        printed = capsys.readouterr().err
        assert (f"privacy pre-flight: noise per coordinate of the mean update sigma*clip/K = "
                f"1.3*1/3 = 0.4333; its walk over 3 rounds sigma*clip*sqrt(T)/K = 0.7506; "
                f"initial weights' RMS {rms:.4g}") in printed
        assert ("WARNING: the DP noise's walk over the run (0.7506) exceeds the initial weights' "
                f"RMS ({rms:.4g})") in printed  # the tiny U-Net's RMS is about 0.1


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


# ---------------------------------------------------------------- adaptive clipping

ADAPTIVE = ["privacy.noise_multiplier=0.3", "privacy.clip_norm=0.05", "privacy.clip_quantile=0.5",
            "privacy.clip_lr=0.5", "privacy.count_noise_std=0.5"]


def _count_noise(seed, done, numel):
    """The count's noise of round ``done``: the (seed, round) stream's draw after the update's."""
    from fedrun.fl.aggregation.transforms import _SERVER_STREAM
    from fedrun.rng import derived_generator

    generator = derived_generator(seed, done - 1, _SERVER_STREAM)
    torch.randn(numel, generator=generator)
    return float(torch.randn((), generator=generator, dtype=torch.float64))


def test_adaptive_clipping_follows_its_noised_count(tiny_config, tmp_path):
    """A real run (6 of 12 clients per round, Poisson): every record's clip norm is the last one
    moved by exp(-eta (b - gamma)); with the count's noise redrawn from the (seed, round) stream,
    (b - 1/2) K - sigma_b N is the centred count of that round's clients: an integer number of
    unclipped clients between 0 and the clients that took part, minus half of them."""
    run_dir = tmp_path / "adaptive"
    shape = [*SHAPE, "clients_per_round=6", "rounds=6", *DP, *ADAPTIVE]
    simulator.run(tiny_config(*shape, output_dir=run_dir))
    records = _records(run_dir)
    numel = sum(t.numel() for t in _weights(run_dir, 6).values())
    clips = [r["dp_clip_norm"] for r in records]
    assert clips[0] == 0.05 and len(set(clips)) == 6
    unclipped = []
    for r, following in zip(records, clips[1:] + [None]):
        b = r["dp_unclipped_fraction"]
        moved = r["dp_clip_norm"] * math.exp(-0.5 * (b - 0.5))
        if following is not None:
            assert following == pytest.approx(moved, rel=1e-14)
        if 0 < b < 1:  # not clamped
            n = len(r["clients"])
            count = (b - 0.5) * 6 - 0.5 * _count_noise(0, r["round"], numel) + n / 2
            assert count == pytest.approx(round(count), abs=1e-9) and 0 <= round(count) <= n
            unclipped.append(round(count))
        assert r["dp_update_noise_multiplier"] == pytest.approx((1 / 0.09 - 1) ** -0.5, rel=1e-15)
    assert len(unclipped) >= 3
    final = json.loads((run_dir / "final" / "privacy.json").read_text())
    adaptive = final["adaptive_clipping"]
    assert adaptive["final_clip_norm"] == pytest.approx(moved, rel=1e-14)
    assert adaptive["initial_clip_norm"] == 0.05 and adaptive["count_noise_std"] == 0.5
    assert final["noise_multiplier"] == 0.3  # the total z, which the accountant uses
    assert final["epsilon"] == pytest.approx(library_epsilon(0.5, 0.3, 6, 1e-5), rel=1e-12)


@pytest.mark.slow
def test_adaptive_clipping_resumes_with_its_clip_norm(tiny_config, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    shape = [*SHAPE, *DP, *ADAPTIVE, "checkpoint.every=1"]
    simulator.run(tiny_config(*shape, "rounds=4", output_dir=full))
    simulator.run(tiny_config(*shape, "rounds=2", output_dir=part))
    simulator.run(tiny_config(*shape, "rounds=4", "resume=auto", output_dir=part))
    for key in ("dp_clip_norm", "dp_unclipped_fraction", "epsilon"):
        assert [r[key] for r in _records(part)] == [r[key] for r in _records(full)], key
    a, b = _weights(full, 4), _weights(part, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_adaptive_clipping_with_pld_one_vs_two_processes_bit_identical(tmp_path):
    """Adaptive clipping's count rides in the round's one buffer: 1 and 2 gloo processes give ==
    weights and the same clip trajectory; the records' epsilon is PLD's. Sigma 0.8, not
    ADAPTIVE's 0.3: PLD's one-round distribution at sigma 0.3 takes ~5 s to build (1.3 s at 0.8),
    once per process and again for the reference value."""
    sigma = 0.8
    shape = ["num_clients=8", "clients_per_round=4", "rounds=3", "checkpoint.every=1", *DP,
             *ADAPTIVE, f"privacy.noise_multiplier={sigma}", "privacy.accountant=pld"]
    outputs = {}
    for world in (1, 2):
        out = tmp_path / f"ws{world}"
        proc = run_cli(["train", *tiny(out, *shape)], torchrun_nproc=world if world > 1 else None)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "privacy pre-flight" in proc.stderr
        outputs[world] = out
    records = {w: _records(outputs[w]) for w in outputs}
    assert any(len(r["clients"]) >= 3 for r in records[1])  # a rank summed several clients
    for key in ("clients", "dp_clip_norm", "dp_unclipped_fraction", "epsilon"):
        assert [r[key] for r in records[1]] == [r[key] for r in records[2]], key
    assert len({r["dp_clip_norm"] for r in records[1]}) == 3
    assert records[1][-1]["epsilon"] == pytest.approx(library_pld_epsilon(0.5, sigma, 3, 1e-5), rel=1e-12)
    for group in ("model", "ema"):
        a, b = _weights(outputs[1], 3, group), _weights(outputs[2], 3, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), group


# ---------------------------------------------------------------- the clip-only control

def test_clip_only_control_is_the_dp_run_without_its_noise(tiny_config, tmp_path):
    """privacy.noise_multiplier=0: the same cohort, clipping and fixed denominator as a DP run;
    after one round the two models differ by exactly the DP run's noise (sigma * clip / K times
    the (seed, round) stream's draw). Epsilon is infinite; adaptive clipping counts exactly."""
    from fedrun.engine.flat import FlatParameters
    from fedrun.fl.aggregation.transforms import _SERVER_STREAM
    from fedrun.rng import derived_generator
    from fedrun.tasks.ddpm.model import build_unet

    shape = [*SHAPE, *DP, "clients_per_round=4", "rounds=1", "ema.enabled=false", "checkpoint.every=1",
             "privacy.clip_norm=0.05", "aggregation.exact=false"]
    finals = {}
    for sigma in (0.0, 0.7):
        run_dir = tmp_path / f"sigma{sigma}"
        simulator.run(tiny_config(*shape, f"privacy.noise_multiplier={sigma}", output_dir=run_dir))
        record = _records(run_dir)[0]
        assert record["clients"] and record["model_updated"]
        cfg = load_config(None, tiny(run_dir, *SHAPE))
        flat = FlatParameters(build_unet(cfg.model, 8, 1, cfg.seed))
        finals[sigma] = (flat.vector_from(_weights(run_dir, 1)), record, run_dir)
    (clean, record0, dir0), (noisy, record1, _) = finals[0.0], finals[0.7]
    assert record0["clients"] == record1["clients"]
    noise = torch.randn(clean.shape, generator=derived_generator(0, 0, _SERVER_STREAM))
    assert torch.allclose(noisy - clean, noise * (0.7 * 0.05 / 4), atol=1e-6)
    assert float((noisy - clean).abs().max()) > 1e-3  # the noise is there in the DP run only
    assert record0["epsilon"] is None and record1["epsilon"] > 0  # infinite: null in the JSON
    final = json.loads((dir0 / "final" / "privacy.json").read_text())
    assert final["epsilon"] is None and "clip-only" in final["epsilon_note"]
    assert final["noise_multiplier"] == 0.0
    assert not final["preflight"]["warning"] and final["preflight"]["noise_walk"] == 0.0

    run_dir = tmp_path / "adaptive"  # the exact count: (b - 1/2) K + n / 2 clients unclipped
    simulator.run(tiny_config(*SHAPE, *DP, "clients_per_round=6", "rounds=3", *ADAPTIVE,
                              "privacy.noise_multiplier=0", output_dir=run_dir))
    for r in _records(run_dir):
        count = (r["dp_unclipped_fraction"] - 0.5) * 6 + len(r["clients"]) / 2
        assert r["dp_update_noise_multiplier"] == 0.0 and r["epsilon"] is None
        assert count == pytest.approx(round(count), abs=1e-12)
