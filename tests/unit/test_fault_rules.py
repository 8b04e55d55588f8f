"""Fault arithmetic without training: dropout schedules and draws, survivors reweighted, non-finite
updates rejected before they are added, fault config validation."""


import pytest
import torch

from fedrun.fl.aggregation.transforms import NonFiniteGuard
from fedrun.fl.aggregation.buffer import RoundBuffer, weighted_loss
from fedrun.engine.cohort import dropped_clients
from fedrun.config import load_config
from fedrun.errors import ConfigError


# ---------------------------------------------------------------- pure arithmetic

def test_dropout_schedule_and_extreme_probabilities():
    cohort = [0, 2, 3, 5]
    schedule = [[1, 2], [2, 5], [2, 0], [3, 7]]  # rounds counted from 1
    assert dropped_clients(cohort, 0.0, schedule, seed=0, global_round=0) == [2]
    assert dropped_clients(cohort, 0.0, schedule, seed=0, global_round=1) == [0, 5]
    assert dropped_clients(cohort, 0.0, schedule, seed=0, global_round=2) == []  # 7 not sampled
    assert dropped_clients(cohort, 0.0, [], seed=0, global_round=0) == []
    assert dropped_clients(cohort, 1.0, [], seed=0, global_round=0) == cohort
    with pytest.raises(ValueError):
        dropped_clients(cohort, 1.5, [], seed=0, global_round=0)


def test_dropout_draw_is_per_client_deterministic_and_has_the_asked_rate():
    # Every rank computes the same answer, and a client's fate does not depend on the cohort.
    full = dropped_clients(list(range(10)), 0.3, [], seed=4, global_round=7)
    assert full == dropped_clients(list(range(10)), 0.3, [], seed=4, global_round=7)
    assert dropped_clients([1, 3, 8], 0.3, [], seed=4, global_round=7) == [c for c in full if c in (1, 3, 8)]
    drops = sum(len(dropped_clients(list(range(20)), 0.3, [], seed=1, global_round=r)) for r in range(100))
    assert abs(drops / 2000 - 0.3) < 0.04  # 2000 Bernoulli(0.3) draws: sd ~ 0.01
    assert dropped_clients(list(range(20)), 0.3, [], 1, 0) != dropped_clients(list(range(20)), 0.3, [], 2, 0)


def test_survivors_are_reweighted_when_a_client_drops():
    # Prepare: three clients around w = [1, 1]; client 5 drops out and never adds anything.
    global_w = torch.tensor([1.0, 1.0])
    buffer = RoundBuffer(num_params=2, cohort=[2, 5, 7], world_size=1)
    buffer.add_client(2, torch.tensor([2.0, 3.0]), global_w, weight=1.0, loss=0.4, samples=8)
    buffer.add_client(7, torch.tensor([5.0, -1.0]), global_w, weight=3.0, loss=0.2, samples=8)
    # Execute
    result = buffer.decode()
    # Assert: deltas [1, 2] (w=1) and [4, -2] (w=3): ([1, 2] + [12, -6]) / 4 = [3.25, -1]
    assert torch.equal(result.mean_update, torch.tensor([3.25, -1.0]))
    assert result.total_weight == 4.0
    assert result.client_weight == {2: 1.0, 5: 0.0, 7: 3.0}
    assert weighted_loss(result) == pytest.approx((0.4 * 1 + 0.2 * 3) / 4)


def test_non_finite_update_is_rejected_before_it_is_added():
    global_w = torch.tensor([1.0, 1.0])
    buffer = RoundBuffer(num_params=2, cohort=[0, 1, 2, 3], world_size=1,
                         transforms=[NonFiniteGuard()])
    assert buffer.add_client(0, torch.tensor([3.0, 1.0]), global_w, 2.0, loss=0.5, samples=4)
    assert not buffer.add_client(1, torch.tensor([float("nan"), 1.0]), global_w, 5.0, loss=0.5, samples=4)
    assert not buffer.add_client(2, torch.tensor([2.0, float("inf")]), global_w, 5.0, loss=0.5, samples=4)
    assert not buffer.add_client(3, torch.tensor([2.0, 2.0]), global_w, 5.0, loss=float("nan"), samples=4)
    result = buffer.decode()
    assert torch.isfinite(buffer.buffer).all()
    assert torch.equal(result.mean_update, torch.tensor([2.0, 0.0]))  # client 0 alone: [2, 0]
    assert result.total_weight == 2.0
    assert result.rejected == [1, 2, 3]
    assert result.client_samples == {0: 4, 1: 4, 2: 4, 3: 4}  # their compute was spent
    assert weighted_loss(result) == pytest.approx(0.5)


def test_fault_config_is_validated():
    cfg = load_config(None, ["faults.dropout=0.25", "faults.dropout_schedule=[[1,0],[3,2]]"])
    assert cfg.faults.dropout == 0.25 and cfg.faults.dropout_schedule == [[1, 0], [3, 2]]
    with pytest.raises(ConfigError, match="'faults.dropout': must be in"):
        load_config(None, ["faults.dropout=1.5"])
    with pytest.raises(ConfigError, match="'faults.dropout_schedule': needs \\[round >= 1"):
        load_config(None, ["faults.dropout_schedule=[[0,1]]"])
    with pytest.raises(ConfigError, match="'faults.nonfinite_schedule': client 9 does not exist"):
        load_config(None, ["num_clients=4", "faults.nonfinite_schedule=[[1,9]]"])


# ---------------------------------------------------------------- the round loop, in process


# ---------------------------------------------------------------- real torchrun jobs


# ---------------------------------------------------------------- runs that cannot learn


# ---------------------------------------------------------------- client state files


