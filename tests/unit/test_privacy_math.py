"""DP-FedAvg without training: clipping against hand values and adversarial norms, the noise seeded
by (seed, round) with std sigma * clip, epsilon equal to dp_accounting's own value (Poisson and
replace-one fixed-size sampling), calibration, refused configs, Poisson cohorts."""


import numpy as np
import pytest
import torch

from dp_reference import library_epsilon
from fedrun.fl.aggregation.buffer import ExactGrid, RoundBuffer
from fedrun.fl.aggregation.transforms import RoundInfo
from fedrun.engine.cohort import sample_cohort
from fedrun.config import load_config
from fedrun.errors import ConfigError
from fedrun.fl.privacy.transforms import DpClip, DpNoise, clip_to_norm_
from fedrun.fl.privacy.accountant import calibrate_noise_multiplier, compute_epsilon, privacy_spec

DP = ["privacy.enabled=true", "server.weighting=uniform"]
SHAPE = ["num_clients=12", "clients_per_round=3", "local_steps=2", "sample.every=0"]


# ---------------------------------------------------------------- clipping (hand values)

def test_clip_to_norm_hand_values():
    delta = torch.tensor([3.0, 4.0])  # norm 5
    assert clip_to_norm_(delta, 1.0) == 5.0
    assert torch.allclose(delta, torch.tensor([0.6, 0.8]))
    small = torch.tensor([0.3, -0.4])  # norm 0.5 < 1: untouched
    assert clip_to_norm_(small, 1.0) == pytest.approx(0.5)
    assert torch.equal(small, torch.tensor([0.3, -0.4]))


def test_dp_clip_in_the_round_buffer_sums_clipped_updates(tiny_config):
    """Two clients, uniform weights, clip 2: [6, 8, 0] -> [1.2, 1.6, 0]; [0, 0, 1] stays."""
    cfg = tiny_config(*DP, "privacy.noise_multiplier=1.0", "privacy.clip_norm=2.0")
    glob = torch.tensor([1.0, 1.0, 1.0])
    for exact in (None, {"update": ExactGrid(3, glob, 2)}):
        buffer = RoundBuffer(3, [0, 1], 1, exact=exact, transforms=[DpClip(cfg)])
        buffer.add_client(0, glob + torch.tensor([6.0, 8.0, 0.0]), glob, 1.0, 0.5, 4)
        buffer.add_client(1, glob + torch.tensor([0.0, 0.0, 1.0]), glob, 1.0, 0.5, 4)
        result = buffer.decode()
        assert torch.allclose(result.update_sum, torch.tensor([1.2, 1.6, 1.0]), atol=1e-6)
        assert result.total_weight == 2.0


def test_dp_noise_is_seeded_by_seed_and_round_with_std_sigma_clip(tiny_config):
    cfg = tiny_config(*DP, "privacy.noise_multiplier=2.0", "privacy.clip_norm=0.5")
    noise = DpNoise(cfg)
    a, b, c = torch.zeros(200_000), torch.zeros(200_000), torch.zeros(200_000)
    metrics = noise(a, RoundInfo(3, 0, 1.0, 1))
    noise(b, RoundInfo(3, 0, 5.0, 2))  # same (seed, round): same noise, whatever else differs
    noise(c, RoundInfo(4, 0, 1.0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.std()) == pytest.approx(1.0, rel=0.01)  # sigma * clip = 2 * 0.5
    assert metrics["epsilon"] == compute_epsilon(cfg.num_clients, cfg.cohort_size,
                                                 "poisson", 2.0, 4, 1e-5)


# ---------------------------------------------------------------- accounting


def test_known_value_and_calibration_hits_the_target():
    # q = 5/50, sigma = 1.1, 4 rounds, delta = 1e-5 -> 2.277 (Poisson): dp_accounting's
    # RdpAccountant, as library_epsilon(0.1, 1.1, 4, 1e-5) gives it
    assert compute_epsilon(50, 5, "poisson", 1.1, 4, 1e-5) == pytest.approx(2.277, abs=1e-3)
    for target in (1.0, 4.0, 8.0):
        sigma = calibrate_noise_multiplier(1000, 10, "poisson", 300, target, 1e-5, 20.0)
        eps = library_epsilon(0.01, sigma, 300, 1e-5)
        assert eps <= target and eps == pytest.approx(target, rel=0.01), (target, sigma, eps)


def test_fixed_size_cohorts_are_accounted_with_replace_one_sensitivity():
    """K = 4 of C = 40, sigma = 1.1, delta = 1e-5: replacing one client moves the sum of clipped
    updates by up to 2 clip, so dp_accounting's multiplier is sigma / 2: epsilon 6.68 after one
    round and 97.2 after 200 (fedrun at 9dcece4 passed sigma and reported 1.90 and 19.1)."""
    for rounds, expected in ((1, 6.6846), (200, 97.183)):
        eps = compute_epsilon(40, 4, "fixed", 1.1, rounds, 1e-5)
        assert eps == pytest.approx(library_epsilon(None, 1.1, rounds, 1e-5, (40, 4)), rel=1e-12)
        assert eps == pytest.approx(expected, rel=1e-4)
    # calibration follows: the sigma found for a target meets it under replace-one accounting
    sigma = calibrate_noise_multiplier(40, 4, "fixed", 50, 8.0, 1e-5, 50.0)
    eps = library_epsilon(None, sigma, 50, 1e-5, (40, 4))
    assert eps <= 8.0 and eps == pytest.approx(8.0, rel=0.01)
    report = privacy_spec(load_config(None, [*DP, "num_clients=40", "clients_per_round=4",
                                             "privacy.sampling=fixed",
                                             "privacy.noise_multiplier=1.1"])).report(1)
    assert report["accountant_noise_multiplier"] == 0.55 and report["sensitivity"] == "2 x clip_norm"


def test_target_epsilon_calibrates_before_round_one(tiny_config):
    cfg = tiny_config(*SHAPE, *DP, "rounds=20", "privacy.target_epsilon=4")
    spec = privacy_spec(cfg)
    assert spec.calibrated_for == {"target_epsilon": 4.0, "rounds": 20}
    assert spec.epsilon(20) <= 4.0 and spec.epsilon(20) == pytest.approx(4.0, rel=0.01)


@pytest.mark.parametrize("overrides, key", [
    (["privacy.enabled=true", "privacy.noise_multiplier=1", "server.weighting=samples"],
     "server.weighting"),  # an explicit samples stays refused
    ([*DP], "privacy.noise_multiplier"),  # neither sigma nor target
    ([*DP, "privacy.noise_multiplier=1", "privacy.target_epsilon=2"], "privacy.noise_multiplier"),
    ([*DP, "privacy.noise_multiplier=1", "privacy.sampling=shuffle"], "privacy.sampling"),
    ([*DP, "privacy.noise_multiplier=1", "privacy.delta=0.5"], "privacy.delta"),
    ([*DP, "privacy.noise_multiplier=1", "privacy.clip_norm=0"], "privacy.clip_norm"),
    (["aggregation.server_transforms=[dp_noise]"], "aggregation.server_transforms"),
    ([*DP, "privacy.noise_multiplier=1",
      "aggregation.update_transforms=[dp_clip,nonfinite_guard]"], "aggregation.update_transforms"),
])
def test_bad_privacy_configs_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, overrides)


def test_enabling_dp_alone_selects_uniform_weighting():
    """privacy.enabled needs no server.weighting: unset, it resolves to uniform under DP (and to
    samples without), and the next error is the one the user sees (an infeasible budget)."""
    assert load_config(None, ["privacy.enabled=true", "privacy.noise_multiplier=1"]).server.weighting == "uniform"
    assert load_config(None, []).server.weighting == "samples"
    cfg = load_config(None, ["privacy.enabled=true", "privacy.target_epsilon=0.01", "rounds=500",
                             "clients_per_round=4"])
    with pytest.raises(ConfigError, match="privacy.target_epsilon.*cannot be met"):
        privacy_spec(cfg)


def test_clipping_bounds_the_norm_exactly_for_adversarial_norms():
    """fp32 scaling rounds every coordinate: norm * (clip / norm) can land a few ulps above
    clip (0.5000000005 for 0.5 at 9dcece4). The clipped update's float64 norm must be <= clip,
    for many sizes, scales and clip values."""
    generator = torch.Generator().manual_seed(0)
    overshoots = 0
    for trial in range(400):
        size = int(torch.randint(1, 5000, (1,), generator=generator))
        delta = torch.randn(size, generator=generator) * float(10 ** torch.empty(1).uniform_(-3, 4, generator=generator))
        clip = [0.5, 1.0, 0.1, 3.3, 1e-3][trial % 5]
        norm = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
        naive = delta * (clip / norm)  # what 9dcece4 did
        overshoots += float(torch.linalg.vector_norm(naive, dtype=torch.float64)) > clip
        clip_to_norm_(delta, clip)
        after = float(torch.linalg.vector_norm(delta, dtype=torch.float64))
        assert after <= clip, (trial, after, clip)
        if norm > clip:
            assert after > clip * (1 - 1e-5)  # clipped to the bound, not far below it
    assert overshoots > 20  # the naive scaling does overshoot on these inputs


def test_dp_clip_leaves_room_for_the_exact_grids_rounding(tiny_config):
    """In exact mode the rounded term, not the fp32 update, enters the sum: its norm must be
    within clip too, whatever the stochastic rounding draws."""
    cfg = tiny_config(*DP, "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.5")
    generator = torch.Generator().manual_seed(1)
    glob = torch.randn(3000, generator=generator)
    grid = ExactGrid(3000, glob, 1)
    for client in range(20):
        buffer = RoundBuffer(3000, [client], 1, exact={"update": grid}, transforms=[DpClip(cfg)])
        local = glob + torch.randn(3000, generator=generator)
        assert buffer.add_client(client, local, glob, 1.0, 0.5, 4)
        summed = buffer.decode().update_sum.double()
        assert float(torch.linalg.vector_norm(summed)) <= 0.5
    assert 0 < grid.error_bound < 1e-6


def test_enabled_inserts_the_transforms_and_central_refuses(tiny_config):
    cfg = tiny_config(*DP, "privacy.noise_multiplier=1")
    assert cfg.aggregation.update_transforms == ["nonfinite_guard", "dp_clip"]
    assert cfg.aggregation.server_transforms == ["dp_noise"]
    from fedrun.engine.central import run_central

    with pytest.raises(ConfigError, match="privacy.enabled"):
        run_central(cfg)


# ---------------------------------------------------------------- sampling and the round

def test_poisson_cohorts_are_seeded_independent_and_may_be_empty():
    cohorts = [sample_cohort(200, 4, 7, r, "poisson") for r in range(500)]
    assert cohorts[3] == sample_cohort(200, 4, 7, 3, "poisson")
    sizes = np.array([len(c) for c in cohorts])
    assert sizes.mean() == pytest.approx(4.0, rel=0.1) and sizes.std() > 1.0
    assert (sizes == 0).any()
    counts = np.bincount(np.concatenate([c for c in cohorts if c]), minlength=200)
    assert counts.mean() == pytest.approx(500 * 0.02, rel=0.1)
    assert all(c == sorted(set(c)) for c in cohorts)
    with pytest.raises(ValueError, match="unknown cohort sampling"):
        sample_cohort(10, 2, 0, 0, "shuffle")


# ---------------------------------------------------------------- 1 vs 2 processes

