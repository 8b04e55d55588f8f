"""DP-FedAvg without training: clipping against hand values and adversarial norms, the noise seeded
by (seed, round) with std sigma * clip, epsilon equal to dp_accounting's own value (Poisson and
replace-one fixed-size sampling), calibration, refused configs, Poisson cohorts."""


import math

import numpy as np
import pytest
import torch

from dp_reference import library_epsilon, library_pld_epsilon, pld_by_hand
from fedrun.fl.aggregation.buffer import ExactGrid, RoundBuffer
from fedrun.fl.aggregation.transforms import RoundInfo
from fedrun.engine.cohort import sample_cohort
from fedrun.config import load_config
from fedrun.errors import ConfigError
from fedrun.fl.privacy.transforms import DpClip, DpNoise, clip_to_norm_
from fedrun.fl.privacy.accountant import calibrate_noise_multiplier, compute_epsilon, privacy_spec
from fedrun.fl.privacy.adaptive import (UNCLIPPED, AdaptiveClipping, centred_bit, next_clip_norm,
                                        unclipped_fraction, update_noise_multiplier)
from fedrun.fl.privacy.preflight import Preflight, weights_rms

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
    ([*DP, "privacy.noise_multiplier=1", "privacy.accountant=moments"], "privacy.accountant"),
    ([*DP, "privacy.noise_multiplier=1", "privacy.accountant=pld", "privacy.sampling=fixed"],
     "privacy.accountant"),  # PLDAccountant refuses replace-one adjacency
    ([*DP, "privacy.noise_multiplier=1", "privacy.clip_quantile=1.0"], "privacy.clip_quantile"),
    ([*DP, "privacy.noise_multiplier=1", "privacy.clip_quantile=0.5", "privacy.clip_lr=0"],
     "privacy.clip_lr"),
    ([*DP, "privacy.noise_multiplier=1", "privacy.count_noise_std=-1"], "privacy.count_noise_std"),
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



# ---------------------------------------------------------------- PLD accounting

def test_pld_epsilon_matches_known_values_and_independent_computations():
    """q = 5/50, sigma = 1.1, 4 rounds: RDP 2.277, PLD 1.821; K = 128 of C = 1,617, sigma = 1,
    500 rounds: RDP 13.9, PLD 12.6 (delta 1e-5). fedrun's PLD path caches the one-round PLD and
    must equal PLDAccountant bit for bit, and the bare PLD self-composition to 1e-9."""
    assert compute_epsilon(50, 5, "poisson", 1.1, 4, 1e-5, "pld") == pytest.approx(1.821, abs=1e-3)
    assert compute_epsilon(1617, 128, "poisson", 1.0, 500, 1e-5) == pytest.approx(13.9, abs=0.05)
    assert compute_epsilon(1617, 128, "poisson", 1.0, 500, 1e-5, "pld") == pytest.approx(12.6, abs=0.05)
    for clients, per_round, sigma, rounds in ((50, 5, 1.1, 4), (12, 3, 1.3, 1), (12, 3, 1.3, 3)):
        q = per_round / clients
        eps = compute_epsilon(clients, per_round, "poisson", sigma, rounds, 1e-5, "pld")
        assert eps == pytest.approx(library_pld_epsilon(q, sigma, rounds, 1e-5), rel=1e-12)
        assert eps == pytest.approx(pld_by_hand(q, sigma, rounds, 1e-5), rel=1e-9)
        assert eps < compute_epsilon(clients, per_round, "poisson", sigma, rounds, 1e-5)
    with pytest.raises(ConfigError, match="'privacy.accountant'"):
        compute_epsilon(40, 4, "fixed", 1.1, 1, 1e-5, "pld")


def test_pld_calibration_meets_the_target_with_less_noise_than_rdp(tiny_config):
    """(PLD's cost grows fast as sigma falls: a setting whose sigma is about 4 keeps this quick.)"""
    cfg = tiny_config(*SHAPE, *DP, "num_clients=100", "clients_per_round=10", "rounds=100",
                      "privacy.target_epsilon=1", "privacy.accountant=pld")
    spec = privacy_spec(cfg)
    eps = library_pld_epsilon(0.1, spec.noise_multiplier, 100, 1e-5)
    assert eps <= 1.0 and eps == pytest.approx(1.0, rel=0.01)
    rdp_sigma = calibrate_noise_multiplier(100, 10, "poisson", 100, 1.0, 1e-5, 20.0)
    assert spec.noise_multiplier < rdp_sigma
    report = spec.report(100)
    assert report["epsilon"] == report["epsilon_pld"] == pytest.approx(eps, rel=1e-12)
    assert report["epsilon_rdp"] == pytest.approx(library_epsilon(0.1, spec.noise_multiplier, 100, 1e-5),
                                                  rel=1e-12)
    assert report["accountant"].startswith("dp_accounting.pld.PLDAccountant")


# ---------------------------------------------------------------- adaptive clipping (pure math)

def test_update_noise_multiplier_splits_the_total_by_hand():
    """Andrew et al. Thm 1: z^-2 = z_Delta^-2 + (2 sigma_b)^-2. z = 1, sigma_b = 2:
    (1 - 1/16)^-1/2 = 1.0327955589886446; z = 1.1, sigma_b = 0.05 * 128 = 6.4:
    (1/1.21 - 1/163.84)^-1/2 = 1.1040845275786701."""
    assert update_noise_multiplier(1.0, 2.0) == pytest.approx(1.0327955589886446, rel=1e-15)
    assert update_noise_multiplier(1.1, 6.4) == pytest.approx(1.1040845275786701, rel=1e-15)
    with pytest.raises(ValueError, match="must exceed"):
        update_noise_multiplier(1.0, 0.5)  # 2 sigma_b = z leaves nothing for the update


def test_clip_norm_tracks_the_quantile_of_hand_made_norms():
    """Norms 0.5, 1.5, 2.0, 0.8 (K = 4), C = 1, gamma = 0.25, eta = 0.2, no count noise: two of
    four fit (b = 0.5), so C shrinks by exp(-0.2 * 0.25) = exp(-0.05) a round: 0.9512, 0.9048, ...
    until it drops below 0.8 after 5 rounds (exp(-0.25) = 0.7788); then one of four fits,
    b = gamma, and C stays."""
    norms, clip = [0.5, 1.5, 2.0, 0.8], 1.0
    trajectory = []
    for _ in range(8):
        centred = sum(centred_bit(n, clip) for n in norms)
        clip = next_clip_norm(clip, unclipped_fraction(centred, 4), 0.25, 0.2)
        trajectory.append(clip)
    assert trajectory[0] == pytest.approx(0.951229424500714, rel=1e-15)
    assert trajectory[1] == pytest.approx(0.9048374180359595, rel=1e-14)
    assert trajectory[4:] == pytest.approx([0.7788007830714049] * 4, rel=1e-14)
    # gamma = 0.8 with b = 0.5: the clip grows by exp(0.06)
    assert next_clip_norm(1.0, 0.5, 0.8, 0.2) == pytest.approx(1.0618365465453596, rel=1e-15)
    # the noised fraction is clamped to [0, 1] (post-processing), a centred sum S gives S/K + 1/2
    assert unclipped_fraction(-3.0, 4) == 0.0 and unclipped_fraction(9.0, 4) == 1.0
    assert unclipped_fraction(-1.0, 4) == 0.25


def test_clip_norm_converges_to_the_target_quantile():
    """Norms 1..100, gamma = 0.3: the clip settles near the 30th norm."""
    norms, clip = np.arange(1, 101), 1.0
    step = AdaptiveClipping(0.3, 0.2, 1.0, 1.0).step
    late = []
    for r in range(400):
        _, clip = step(clip, sum(centred_bit(n, clip) for n in norms), len(norms))
        late += [clip] if r >= 300 else []
    assert 28.0 <= min(late) and max(late) <= 32.0


def test_adaptive_dp_clip_sends_its_bits_in_the_one_buffer(tiny_config):
    """Hand-made updates of norm 0.5, 1.5, 2.0, 0.8 at clip 1: the buffer's one extra slot sums
    b_i - 1/2 = 1/2 - 1/2 - 1/2 + 1/2 = 0 (and +1/2 for client 4, norm 0.3), in fp32 and exact
    mode; the buffer is one float longer than without adaptive clipping."""
    cfg = tiny_config(*DP, "privacy.noise_multiplier=1.0", "privacy.clip_quantile=0.5",
                      "privacy.count_noise_std=2")
    clip = DpClip(cfg)
    assert clip.scalar_slots == (UNCLIPPED,) and DpClip(tiny_config(*DP, "privacy.noise_multiplier=1")).scalar_slots == ()
    glob = torch.zeros(4)
    for exact in (None, {"update": ExactGrid(4, glob + 1, 5)}):
        buffer = RoundBuffer(4, [0, 1, 2, 3, 4], 1, exact=exact, transforms=[clip], scalars=clip.scalar_slots)
        plain = RoundBuffer(4, [0, 1, 2, 3, 4], 1, exact=exact, transforms=[clip])
        assert buffer.buffer.numel() == plain.buffer.numel() + 1
        for client, norm in enumerate([0.5, 1.5, 2.0, 0.8]):
            buffer.add_client(client, torch.tensor([norm, 0, 0, 0]), glob, 1.0, 0.1, 1)
        assert buffer.decode().scalars == {UNCLIPPED: 0.0}
        buffer.add_client(4, torch.tensor([0, 0.3, 0, 0]), glob, 1.0, 0.1, 1)
        result = buffer.decode()
        assert result.scalars == {UNCLIPPED: 0.5} and result.total_weight == 5.0
        assert result.client_loss == {c: pytest.approx(0.1) for c in range(5)}


def test_adaptive_dp_noise_noises_the_count_from_the_round_stream_and_moves_the_clip(tiny_config):
    """dp_noise: update noise of std z_Delta * C, then sigma_b * N from the same (seed, round)
    stream on the count; b = (S + sigma_b N) / K + 1/2 and C' = C exp(-eta (b - gamma)),
    recomputed here from the generator by hand."""
    from fedrun.fl.aggregation.transforms import _SERVER_STREAM
    from fedrun.fl.privacy.transforms import share_clip_norm
    from fedrun.rng import derived_generator

    cfg = tiny_config(*SHAPE, *DP, "num_clients=40", "clients_per_round=20", "privacy.noise_multiplier=1.0",
                      "privacy.clip_norm=0.5", "privacy.clip_quantile=0.7", "privacy.clip_lr=0.3")
    noise, clip = DpNoise(cfg), DpClip(cfg)
    assert share_clip_norm([clip], [noise]) is noise.clip and clip.clip is noise.clip
    sigma_b = 0.05 * 20  # count_noise_std null: 0.05 K
    z_delta = (1.0 - 1 / (2 * sigma_b) ** 2) ** -0.5
    update = torch.zeros(1000)
    metrics = noise(update, RoundInfo(5, 3, 12.0, 12, scalars={UNCLIPPED: -2.0}))
    generator = derived_generator(3, 5, _SERVER_STREAM)
    expected = torch.randn(1000, generator=generator) * (z_delta * 0.5)
    assert torch.allclose(update, expected, rtol=1e-6, atol=0)
    n = float(torch.randn((), generator=generator, dtype=torch.float64))
    fraction = min(1.0, max(0.0, (-2.0 + sigma_b * n) / 20 + 0.5))
    assert metrics["dp_unclipped_fraction"] == pytest.approx(fraction, rel=1e-15)
    assert metrics["dp_clip_norm"] == 0.5 and metrics["dp_update_noise_multiplier"] == pytest.approx(z_delta)
    assert clip.clip_norm == pytest.approx(0.5 * np.exp(-0.3 * (fraction - 0.7)), rel=1e-15)
    assert metrics["dp_noise_multiplier"] == 1.0  # the total, as accounted


def test_adaptive_clipping_refuses_a_count_noise_too_small_for_the_budget(tiny_config):
    cfg = tiny_config(*SHAPE, *DP, "privacy.noise_multiplier=1.0", "privacy.clip_quantile=0.5")
    with pytest.raises(ConfigError, match="'privacy.count_noise_std'.*0.15"):  # 0.05 x 3 clients
        privacy_spec(cfg)
    spec = privacy_spec(tiny_config(*SHAPE, *DP, "privacy.noise_multiplier=1.0",
                                    "privacy.clip_quantile=0.5", "privacy.count_noise_std=2"))
    assert spec.update_noise_multiplier == pytest.approx(1.0327955589886446, rel=1e-15)
    assert spec.epsilon(5) == compute_epsilon(12, 3, "poisson", 1.0, 5, 1e-5)  # the total z


# ---------------------------------------------------------------- the pre-flight check

def test_preflight_arithmetic_by_hand():
    """A regime like the committed privacy report's: sigma 1.1, clip 1, K = 10, 250 rounds,
    weights' RMS 0.057: noise 0.11 per coordinate, walk 0.11 * sqrt(250) = 1.7393, 30.5 x."""
    check = Preflight(1.1, 1.0, 10, 250, 0.057)
    assert check.noise_per_coordinate == pytest.approx(0.11, rel=1e-15)
    assert check.noise_walk == pytest.approx(1.7392527130926085, rel=1e-15)
    assert check.walk_over_weights == pytest.approx(30.51320549285278, rel=1e-14)
    assert check.warns and check.lines()[1].startswith("WARNING")
    quiet = Preflight(1.0, 0.1, 256, 100, 0.05)  # 1/2560 per coordinate, walk 0.0039 < 0.05
    assert quiet.noise_per_coordinate == pytest.approx(0.000390625, rel=1e-15)
    assert quiet.noise_walk == pytest.approx(0.00390625, rel=1e-15)
    assert not quiet.warns and len(quiet.lines()) == 1
    assert weights_rms(torch.tensor([3.0, 4.0])) == pytest.approx(3.5355339059327373, rel=1e-15)


def test_lora_preflight_checks_the_walk_on_the_adapted_weights():
    """peft LoRA layers (B = 0): the walk w on A and B moves an adapted weight by
    s * sqrt(r) * w * sqrt(rms(A)^2 + w^2), checked by drawing the noise into a real peft layer
    and reading its merged delta; that, not the LoRA vector, is compared with the base weights'
    RMS (a walk 4x the LoRA vector's RMS that does not warn)."""
    from peft import LoraConfig, inject_adapter_in_model

    from fedrun.fl.privacy.preflight import lora_scales

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48))
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), model)
    layer = model[0]
    scales = lora_scales(model)
    a = layer.lora_A["default"].weight
    assert scales["rank"] == 4 and scales["scale"] == 2.0 and scales["a_noised"]
    assert scales["a_rms"] == pytest.approx(weights_rms(a), rel=1e-12)
    assert scales["base_rms"] == pytest.approx(weights_rms(layer.get_base_layer().weight), rel=1e-12)
    walk = 0.05
    deltas = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):  # B = 0 + xi_B, A + xi_A: the merged delta s B A
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(walk * torch.randn(48, 4, generator=generator))
            noisy_a = a + walk * torch.randn(a.shape, generator=generator)
            deltas.append(2.0 * layer.lora_B["default"].weight @ noisy_a)
    measured = float(torch.stack(deltas).std())
    vector_rms = weights_rms(torch.cat([a.detach().flatten(), torch.zeros(192)]))  # A and B = 0
    check = Preflight(walk, 1.0, 1, 1, vector_rms, scales)  # sigma * clip * sqrt(T) / K = walk
    expected = 2.0 * 2.0 * walk * math.sqrt(scales["a_rms"] ** 2 + walk ** 2)
    assert check.adapted_walk == pytest.approx(expected, rel=1e-12)
    assert measured == pytest.approx(expected, rel=0.03)  # 200 x 3,072 draws
    wider = Preflight(0.06, 1.0, 1, 1, vector_rms, scales)  # beyond the LoRA vector's RMS 0.054
    assert wider.walk_over_weights > 1.0 > wider.ratio and not wider.warns
    assert "the walk moves the adapted weights by" in wider.lines()[1] and len(wider.lines()) == 2
    assert Preflight(1.0, 1.0, 1, 1, vector_rms, scales).lines()[2].startswith("WARNING: the DP noise's walk moves the adapted")
    frozen = Preflight(walk, 1.0, 1, 1, 0.1, {**scales, "a_noised": False})  # FFA-LoRA: A fixed
    assert frozen.adapted_walk == pytest.approx(2.0 * 2 * walk * scales["a_rms"], rel=1e-12)
    assert lora_scales(torch.nn.Linear(3, 3)) is None and lora_scales(None) is None
