"""Pure aggregation math, server steps and rank logic, against hand-computed values."""

import math

import pytest
import torch

from fedrun.fl.aggregation.buffer import RoundBuffer, client_weight, weighted_loss, weighted_mean
from fedrun.engine.cohort import assign_to_ranks, sample_cohort
from fedrun.config import EMAConfig
from fedrun.engine.ema import EMA
from fedrun.fl.strategies import FedAvg, FedAvgM


def test_weighted_mean_matches_hand_computation():
    # Prepare
    updates = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0]), torch.tensor([0.0, 10.0])]
    weights = [1.0, 3.0, 4.0]
    # Execute
    mean = weighted_mean(updates, weights)
    # Assert: (1*1 + 3*3 + 4*0)/8 = 1.25 ; (1*2 - 3*2 + 4*10)/8 = 4.5
    assert torch.allclose(mean, torch.tensor([1.25, 4.5]))


def test_weighted_mean_rejects_bad_weights():
    with pytest.raises(ValueError):
        weighted_mean([torch.ones(2)], [0.0])
    with pytest.raises(ValueError):
        weighted_mean([torch.ones(2)], [1.0, 2.0])


def test_client_weight():
    assert client_weight(37, "samples") == 37.0
    assert client_weight(37, "uniform") == 1.0
    with pytest.raises(ValueError):
        client_weight(3, "bogus")


def test_round_buffer_sums_weighted_deltas_and_stats():
    global_w = torch.tensor([1.0, 1.0, 1.0])
    buffer = RoundBuffer(num_params=3, cohort=[2, 5, 7], world_size=2)
    buffer.add_client(5, torch.tensor([2.0, 1.0, 0.0]), global_w, weight=2.0, loss=0.5, samples=8)
    buffer.add_client(2, torch.tensor([1.0, 3.0, 1.0]), global_w, weight=6.0, loss=0.1, samples=24)
    buffer.set_compute_time(1, 4.5)
    result = buffer.decode()
    # deltas: client 5 -> [1, 0, -1] (w=2), client 2 -> [0, 2, 0] (w=6); sum = [2, 12, -2] / 8
    assert torch.allclose(result.mean_update, torch.tensor([0.25, 1.5, -0.25]))
    assert result.total_weight == 8.0
    assert result.client_loss[5] == pytest.approx(0.5)
    assert result.client_loss[2] == pytest.approx(0.1)
    assert math.isnan(result.client_loss[7]) and result.client_weight[7] == 0
    assert result.client_samples == {2: 24, 5: 8, 7: 0}
    assert result.rank_compute_s == [0.0, 4.5]
    assert weighted_loss(result) == pytest.approx((0.5 * 2 + 0.1 * 6) / 8)


def test_round_buffer_sum_of_two_ranks_equals_one_process():
    """Adding two ranks' buffers (what all_reduce does) gives the one-process buffer."""
    global_w = torch.zeros(4)
    locals_ = {0: torch.arange(4.0), 1: torch.ones(4), 2: -torch.arange(4.0) * 2}
    weights = {0: 10.0, 1: 1.0, 2: 5.0}
    whole = RoundBuffer(4, [0, 1, 2], world_size=2)
    rank0, rank1 = RoundBuffer(4, [0, 1, 2], 2), RoundBuffer(4, [0, 1, 2], 2)
    for c in (0, 1, 2):
        whole.add_client(c, locals_[c], global_w, weights[c], loss=c, samples=4)
        (rank0 if c != 1 else rank1).add_client(c, locals_[c], global_w, weights[c], loss=c, samples=4)
    rank0.buffer += rank1.buffer
    expected = weighted_mean([locals_[c] for c in (0, 1, 2)], [weights[c] for c in (0, 1, 2)])
    assert torch.allclose(rank0.decode().mean_update, expected)
    assert torch.equal(rank0.buffer, whole.buffer)


def test_empty_round_gives_zero_update():
    result = RoundBuffer(3, [0, 1], 1).decode()
    assert result.total_weight == 0
    assert torch.equal(result.mean_update, torch.zeros(3))
    assert math.isnan(weighted_loss(result))


def test_fedavg_server_step_is_the_weighted_average_of_client_models():
    global_w = torch.tensor([1.0, 2.0])
    clients = [torch.tensor([3.0, 2.0]), torch.tensor([1.0, 0.0])]
    weights = [1.0, 3.0]
    buffer = RoundBuffer(2, [0, 1], 1)
    for c, (w_c, n) in enumerate(zip(clients, weights)):
        buffer.add_client(c, w_c, global_w, n, 0.0, 1)
    FedAvg(lr=1.0).step(global_w, buffer.decode().mean_update)
    assert torch.allclose(global_w, weighted_mean(clients, weights))  # [1.5, 0.5]
    assert torch.allclose(global_w, torch.tensor([1.5, 0.5]))


def test_fedavgm_momentum_hand_computed():
    w = torch.zeros(1)
    server = FedAvgM(lr=1.0, params=FedAvgM.Params(momentum=0.5))
    server.step(w, torch.tensor([1.0]))  # v = 1, w = 1
    server.step(w, torch.tensor([1.0]))  # v = 1.5, w = 2.5
    assert w.item() == pytest.approx(2.5)
    restored = FedAvgM(lr=1.0, params=FedAvgM.Params(momentum=0.5))
    restored.load_state_dict(server.state_dict())
    restored.step(w, torch.tensor([0.0]))  # v = 0.75, w = 3.25
    assert w.item() == pytest.approx(3.25)


def test_ema_warmup_and_decay():
    # update r uses min(decay, r / (r + 1)): the running mean until it reaches the decay
    ema = EMA(torch.zeros(1), EMAConfig(enabled=True, decay=0.95))
    ema.update(torch.full((1,), 2.0))  # decay 0: the initialisation is forgotten
    assert ema.shadow.item() == 2.0
    ema.update(torch.full((1,), 5.0))  # decay 1/2 -> (2 + 5) / 2
    assert ema.shadow.item() == pytest.approx(3.5)
    ema.update(torch.full((1,), 8.0))  # decay 2/3 -> (2 + 5 + 8) / 3
    assert ema.shadow.item() == pytest.approx(5.0)
    assert ema.decay_at(18) == pytest.approx(18 / 19) and ema.decay_at(19) == 0.95
    assert ema.decay_at(10_000) == 0.95
    short = EMA(torch.zeros(1), EMAConfig(enabled=True, decay=0.5))
    for value in (2.0, 4.0, 6.0):  # decays 0, 1/2, then 1/2: 2 -> 3 -> 4.5
        short.update(torch.full((1,), value))
    assert short.shadow.item() == pytest.approx(4.5)
    off = EMA(torch.zeros(1), EMAConfig(enabled=False))
    off.update(torch.full((1,), 3.0))
    assert off.shadow.item() == 3.0


def ema_round_weights(decay: float, rounds: int) -> torch.Tensor:
    """The weight the EMA gives each round's global weights after ``rounds`` updates: round r's
    weights are the unit vector e_r, so the shadow is the weight vector itself."""
    ema = EMA(torch.zeros(rounds, dtype=torch.float64), EMAConfig(enabled=True, decay=decay))
    for r in range(rounds):
        ema.update(torch.eye(rounds, dtype=torch.float64)[r])
    return ema.shadow


def mean_sample_age(weights: torch.Tensor, round_samples: int) -> float:
    """sum over rounds of weight x age, the age of round r's weights after R rounds being the
    samples seen since: (R - 1 - r) x round_samples."""
    rounds = len(weights)
    return sum(float(weights[r]) * (rounds - 1 - r) * round_samples for r in range(rounds))


def test_ema_mean_sample_age_is_the_configured_horizon():
    # Prepare: a horizon of H = 12 samples at S = 4 samples per round; fedrun compare's decay
    horizon, round_samples = 12, 4
    decay = horizon / (horizon + round_samples)
    assert decay == 0.75
    # Execute / Assert, by hand after 6 rounds: updates 0..3 (decays 0, 1/2, 2/3, 3/4) give the
    # first four rounds 1/4 each, then two updates at 3/4
    weights = ema_round_weights(decay, 6)
    expected = [9 / 64, 9 / 64, 9 / 64, 9 / 64, 3 / 16, 1 / 4]
    assert weights.tolist() == pytest.approx(expected, abs=1e-15)
    # mean age (9/64 (5 + 4 + 3 + 2) + 3/16 x 1) rounds = 138/64 rounds = 8.625 samples
    assert mean_sample_age(weights, round_samples) == pytest.approx(138 / 64 * 4, abs=1e-12)
    # the mean age rises monotonically towards the horizon, never above it, and reaches it
    ages = [mean_sample_age(ema_round_weights(decay, rounds), round_samples) for rounds in range(1, 41)]
    assert ages[:4] == pytest.approx([0.0, 2.0, 4.0, 6.0], abs=1e-12)  # running mean: (m - 1) / 2 rounds
    assert all(a <= b + 1e-12 for a, b in zip(ages, ages[1:])) and max(ages) <= horizon + 1e-12
    assert ages[-1] == pytest.approx(horizon, abs=1e-3)  # 12 - 6 x 0.75^36 = 11.99981
    long = ema_round_weights(decay, 200)
    assert float(long.sum()) == pytest.approx(1.0, abs=1e-12)
    assert mean_sample_age(long, round_samples) == pytest.approx(horizon, abs=1e-9)


def test_cohort_is_deterministic_sorted_and_varies_by_round():
    a = sample_cohort(10, 3, seed=0, global_round=4)
    assert a == sample_cohort(10, 3, seed=0, global_round=4)
    assert a == sorted(a) and len(set(a)) == 3 and all(0 <= c < 10 for c in a)
    assert len({tuple(sample_cohort(10, 3, 0, r)) for r in range(20)}) > 5
    assert sample_cohort(4, 4, seed=9, global_round=0) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        sample_cohort(3, 4, 0, 0)


def test_assign_to_ranks_rank_k_is_client_k_and_balanced():
    assert assign_to_ranks([0, 1, 2, 3], 4) == [[0], [1], [2], [3]]
    assert assign_to_ranks(list(range(8)), 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert assign_to_ranks([3, 8], 4) == [[3], [8], [], []]  # more ranks than clients
    # costs: LPT puts the big client alone
    assert assign_to_ranks([0, 1, 2], 2, costs=[10, 4, 5]) == [[0], [1, 2]]
    every = [c for rank in assign_to_ranks(list(range(13)), 3) for c in rank]
    assert sorted(every) == list(range(13))


def test_round_buffer_reuse_takes_over_storage_and_matches_a_fresh_buffer():
    """The simulator reuses last round's storage (no per-round allocation): same bits as fresh."""
    generator = torch.Generator().manual_seed(0)
    global_w = torch.randn(1000, generator=generator)
    locals_ = [global_w + 0.01 * torch.randn(1000, generator=generator) for _ in range(3)]
    weights = [37.0, 5.0, 11.0]

    def fill(buffer):
        for c, (local, weight) in enumerate(zip(locals_, weights)):
            buffer.add_client(c, local, global_w, weight, loss=0.1 * c, samples=8)
        buffer.set_compute_time(0, 2.0)
        return buffer

    previous = fill(RoundBuffer(1000, [0, 1, 2], 1))
    previous.decode()
    reused = fill(RoundBuffer(1000, [0, 1, 2], 1, reuse=previous))
    fresh = fill(RoundBuffer(1000, [0, 1, 2], 1))
    assert reused.buffer.data_ptr() == previous.buffer.data_ptr()
    assert torch.equal(reused.buffer, fresh.buffer)
    assert torch.equal(reused.decode().mean_update, fresh.decode().mean_update)
    # A different size (another cohort size) cannot reuse: it allocates.
    other = RoundBuffer(1000, [0, 1], 1, reuse=reused)
    assert other.buffer.data_ptr() != reused.buffer.data_ptr()
    assert torch.count_nonzero(other.buffer) == 0


def test_round_buffer_rounds_like_separate_products_summed():
    """n * delta is rounded before it is summed, for the first client (written in place) and the
    others (via scratch) alike: the buffer equals the plain sum of rounded products, bit for bit."""
    generator = torch.Generator().manual_seed(1)
    global_w = torch.randn(4096, generator=generator)
    locals_ = [global_w + torch.randn(4096, generator=generator) * 1e-3 for _ in range(3)]
    weights = [3.0, 7.0, 113.0]
    buffer = RoundBuffer(4096, [0, 1, 2], 1)
    for c in range(3):
        buffer.add_client(c, locals_[c], global_w, weights[c], loss=0.0, samples=1)
    expected = torch.zeros(4096)
    for local, weight in zip(locals_, weights):
        expected = expected + (local - global_w) * weight
    assert torch.equal(buffer.buffer[:4096], expected)
    before = buffer.buffer.clone()
    result = buffer.decode()
    assert torch.equal(buffer.buffer, before)  # decoding leaves the reduced buffer intact
    assert torch.equal(result.mean_update, expected / sum(weights))


def test_server_step_folds_the_division_into_its_pass():
    """step(w, sum n*delta, sum n) equals step(w, mean) for FedAvg and FedAvgM."""
    update_sum, total = torch.tensor([3.0, -6.0, 1.5]), 3.0
    mean = update_sum / total
    a, b = torch.ones(3), torch.ones(3)
    FedAvg(lr=0.5).step(a, update_sum, total)
    FedAvg(lr=0.5).step(b, mean)
    assert torch.allclose(a, torch.tensor([1.5, 0.0, 1.25]), atol=1e-6) and torch.allclose(a, b, atol=1e-6)
    m1, m2 = FedAvgM(lr=1.0, params=FedAvgM.Params(momentum=0.5)), FedAvgM(lr=1.0, params=FedAvgM.Params(momentum=0.5))
    for _ in range(2):
        m1.step(a, update_sum, total)
        m2.step(b, mean)
    assert torch.allclose(a, b, atol=1e-6)


def _grouped_sum(groups, locals_, weights, global_w, exact):
    """Each group is one rank's buffer; adding the buffers is what all_reduce(SUM) does."""
    from fedrun.fl.aggregation.buffer import ExactGrid

    total = None
    cohort = list(range(len(locals_)))
    for group in groups:
        grids = {"update": ExactGrid(global_w.numel(), global_w, sum(weights))} if exact else None
        buffer = RoundBuffer(global_w.numel(), cohort, len(groups), exact=grids)
        for c in group:
            buffer.add_client(c, locals_[c], global_w, weights[c], loss=0.1, samples=4)
        if total is None:
            total = buffer
        else:
            total.buffer += buffer.buffer
    return total.decode().update_sum.clone()


def test_exact_sum_does_not_depend_on_how_clients_are_grouped():
    """5 clients summed as one rank, 3 + 2, 2 + 2 + 1 or in another order: == in exact mode;
    the fp32 path (the positive control) differs for the same inputs."""
    generator = torch.Generator().manual_seed(3)
    global_w = torch.randn(5000, generator=generator) * 0.1
    locals_ = [global_w + torch.randn(5000, generator=generator) * 1e-3 * (c + 1) for c in range(5)]
    weights = [13.0, 7.0, 101.0, 3.0, 55.0]
    groupings = [[[0, 1, 2, 3, 4]], [[0, 2, 4], [1, 3]], [[4, 3], [2, 1], [0]], [[3], [1, 4, 0, 2]]]
    exact = [_grouped_sum(g, locals_, weights, global_w, True) for g in groupings]
    assert all(torch.equal(exact[0], other) for other in exact[1:])
    plain = [_grouped_sum(g, locals_, weights, global_w, False) for g in groupings]
    assert not all(torch.equal(plain[0], other) for other in plain[1:])
    # and exact is at least as accurate as fp32 against a float64 reference
    reference = sum(w * (l.double() - global_w.double()) for l, w in zip(locals_, weights))
    error = lambda s: float((s.double() - reference).abs().max() / reference.abs().max())  # noqa: E731
    assert error(exact[0]) < 1e-7 and error(exact[0]) <= error(plain[0])


def test_exact_grid_hand_computed():
    """Block bound 2**e from the reference (here max 3.0 -> e = 2), F = 53 - ceil(log2 W) - 6:
    W = 8 -> F = 44, so a term is rounded to multiples of 2**(2 - 44)."""
    from fedrun.fl.aggregation.buffer import ExactGrid

    grid = ExactGrid(3, torch.tensor([3.0, -1.0, 0.5]), weight_bound=8.0)
    assert grid.fraction_bits == 44 and grid.limit == 2.0 ** 50
    assert float(grid.grid[0]) == 2.0 ** -42 and float(grid.inverse[0]) == 2.0 ** 42
    values = torch.zeros(1024)
    values[:3] = torch.tensor([2.0 ** -42 * 2.6, -1.0, 2.0 ** -44])
    assert grid.quantize_(values)
    assert values[:3].tolist() == [3.0, -(2.0 ** 42), 0.0]  # round-half-even of 0.25 is 0
    # A reference of zeros (LoRA's B at init) falls back to a bound of 2: grid 2**(1 - F).
    zeros = ExactGrid(10, torch.zeros(10), weight_bound=1.0)
    assert float(zeros.grid[0]) == 2.0 ** (1 - 47)


def test_exact_mode_rejects_an_update_beyond_its_range_and_needs_integer_weights():
    from fedrun.fl.aggregation.buffer import ExactGrid

    global_w = torch.ones(8)
    grids = {"update": ExactGrid(8, global_w, weight_bound=3.0)}
    buffer = RoundBuffer(8, [0, 1], 1, exact=grids)
    huge = global_w.clone()
    huge[3] = 1e3  # a term 999 x the block's bound 2: beyond the 2**6 headroom
    assert not buffer.add_client(0, huge, global_w, 1.0, loss=0.1, samples=2)
    assert buffer.add_client(1, global_w + 0.5, global_w, 2.0, loss=0.1, samples=2)
    result = buffer.decode()
    assert result.rejected_by == {0: "exact_range"} and result.total_weight == 2.0
    assert torch.equal(result.mean_update, torch.full((8,), 0.5))
    with pytest.raises(ValueError, match="integer client weights"):
        RoundBuffer(8, [0], 1, exact=grids).add_client(0, global_w, global_w, 0.5, 0.1, 2)


def test_a_segment_beyond_the_exact_range_rejects_the_client_not_the_run():
    """At 9dcece4 a control-variate coordinate >= 128 (reference None: bound 2, headroom 2**6)
    raised ValueError and stopped the run. Now the client is rejected, recorded as
    'exact_range:<segment>', and nothing of it enters the sum."""
    from fedrun.fl.aggregation.buffer import ExactGrid, Segment

    global_w = torch.ones(8)
    grids = {"update": ExactGrid(8, global_w, weight_bound=3.0),
             "control": ExactGrid(8, None, weight_bound=2.0)}
    buffer = RoundBuffer(8, [0, 1], 1, exact=grids, segments=[Segment("control", 8)])
    control = torch.zeros(8)
    control[5] = 200.0
    assert not buffer.add_client(0, global_w + 0.25, global_w, 1.0, loss=0.1, samples=2,
                                 segments={"control": control})
    assert buffer.add_client(1, global_w + 0.5, global_w, 2.0, loss=0.1, samples=2,
                             segments={"control": torch.full((8,), 3.0)})
    result = buffer.decode()
    assert result.rejected_by == {0: "exact_range:control"} and result.total_weight == 2.0
    assert torch.equal(result.mean_update, torch.full((8,), 0.5))
    assert torch.equal(result.segments["control"], torch.full((8,), 3.0))


def test_stochastic_rounding_is_unbiased_where_nearest_loses_small_updates():
    """A coordinate 0.3 grid steps large rounds to 0 every time under round-to-nearest: such an
    update is lost every round. Stochastic rounding keeps it in expectation: 1 with probability
    0.3. Integers stay as they are; the draws come from the generator (same seed, same bits)."""
    from fedrun.fl.aggregation.buffer import EXACT_BLOCK, ExactGrid

    n = 64 * EXACT_BLOCK
    reference = torch.ones(n)
    grid = ExactGrid(n, reference, weight_bound=1.0)
    step = float(grid.grid[0])
    values = torch.full((n,), 0.3 * step)
    values[:4] = torch.tensor([2.0, -3.0, 0.0, -0.3]) * step
    nearest = values.clone()
    assert grid.quantize_(nearest) and float(nearest[4:].abs().max()) == 0.0
    a, b = values.clone(), values.clone()
    assert grid.quantize_(a, torch.Generator().manual_seed(5))
    assert grid.quantize_(b, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and set(a[4:].unique().tolist()) == {0.0, 1.0}
    assert a[:3].tolist() == [2.0, -3.0, 0.0] and a[3].item() in (-1.0, 0.0)
    mean = float(a[4:].double().mean())
    assert abs(mean - 0.3) < 6 * (0.21 / (n - 4)) ** 0.5, mean  # binomial: within 6 sigma
    # 200 rounds of the same 0.3-step update: their sum keeps ~60 steps per coordinate
    total = torch.zeros(EXACT_BLOCK, dtype=torch.float64)
    small = ExactGrid(EXACT_BLOCK, torch.ones(EXACT_BLOCK), 1.0)
    for r in range(200):
        term = torch.full((EXACT_BLOCK,), 0.3 * step)
        assert small.quantize_(term, torch.Generator().manual_seed(r))
        total += term.double()
    assert abs(float(total.mean()) - 60.0) < 1.0, float(total.mean())
    assert grid.error_bound == pytest.approx(step * n ** 0.5)
    assert ExactGrid(n, reference, 1.0, rounding="nearest").error_bound == pytest.approx(0.5 * step * n ** 0.5)
