"""The adaptive server optimizers (FedAdam, FedYogi, FedAdagrad) against the paper's update rules
evaluated coordinate by coordinate, server-lr defaults, and the configs that refuse an algorithm's
preconditions (SCAFFOLD needs plain SGD)."""

import math

import pytest
import torch

from fedrun.config import load_config, make_section
from fedrun.errors import ConfigError
from fedrun.fl.strategies import FedAdagrad, FedAdam, FedYogi, build_server


ROUNDS = [torch.tensor([0.10, -0.20, 0.0]), torch.tensor([0.10, 0.05, 0.0]),
          torch.tensor([-0.30, 0.20, 1e-4])]


def _reference(kind, updates, lr, beta1, beta2, tau):
    """Reddi et al. (2021), Algorithm 2, one coordinate at a time with Python floats."""
    out = []
    for i in range(len(updates[0])):
        w, m, v = 0.0, 0.0, tau * tau
        for d in (float(u[i]) for u in updates):
            m = beta1 * m + (1 - beta1) * d
            if kind == "fedadam":
                v = beta2 * v + (1 - beta2) * d * d
            elif kind == "fedyogi":
                v = v - (1 - beta2) * d * d * math.copysign(1.0, v - d * d) * (v != d * d)
            else:
                v = v + d * d
            w += lr * m / (math.sqrt(v) + tau)
        out.append(w)
    return out


@pytest.mark.parametrize("cls, kind", [(FedAdam, "fedadam"), (FedYogi, "fedyogi"),
                                       (FedAdagrad, "fedadagrad")])
def test_adaptive_strategies_follow_the_paper_over_three_rounds(cls, kind):
    params = cls.Params(beta1=0.9, tau=1e-3, **({} if kind == "fedadagrad" else {"beta2": 0.99}))
    server = cls(0.05, params)
    weights = torch.zeros(3)
    for update in ROUNDS:
        # the round's sum of n_c * delta_c with total weight 4: the mean update is ``update``
        server.step(weights, update * 4.0, 4.0)
    expected = _reference(kind, ROUNDS, 0.05, 0.9, 0.99, 1e-3)
    assert weights.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    # state survives a state_dict round trip
    restored = cls(0.05, params)
    restored.load_state_dict({k: v.clone() for k, v in server.state_dict().items()})
    a, b = weights.clone(), weights.clone()
    server.step(a, ROUNDS[0], 1.0)
    restored.step(b, ROUNDS[0], 1.0)
    assert torch.equal(a, b)


def test_fedadam_first_round_by_hand():
    """Round 1 of FedAdam on d = 0.1, by hand: m = 0.01, v = 0.99e-6 + 1e-4 = 1.0099e-4,
    w = 0.01 * 0.01 / (sqrt(1.0099e-4) + 1e-3) = 9.0501e-3."""
    server = build_server(make_section("server", strategy="fedadam"))  # default lr 0.01, tau 1e-3
    weights = torch.zeros(1)
    server.step(weights, torch.tensor([0.1]), 1.0)
    assert weights.item() == pytest.approx(0.01 * 0.01 / (math.sqrt(1.0099e-4) + 1e-3), rel=1e-6)
    assert weights.item() == pytest.approx(9.0501e-3, rel=1e-4)


def test_server_lr_defaults_per_strategy_and_bad_values_are_named():
    assert build_server(make_section("server")).lr == 1.0
    assert build_server(make_section("server", strategy="fedavgm")).lr == 1.0
    assert build_server(make_section("server", strategy="fedyogi")).lr == 0.01
    assert build_server(make_section("server", strategy="fedadam", lr=0.3)).lr == 0.3
    adam, prox = ["server.strategy=fedadam"], ["client.algorithm=fedprox"]
    for key, value, extra in [("server.tau", "0", adam), ("server.beta2", "1.0", adam),
                              ("server.beta1", "-0.1", adam), ("client.prox_mu", "-1", prox),
                              ("optim.name", "adam", []), ("optim.momentum", "1.5", [])]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [*extra, f"{key}={value}"])


# ---------------------------------------------------------------- FedProx and SCAFFOLD


@pytest.mark.parametrize("overrides, named", [
    ([], ["optim.name=adamw", "optim.grad_clip=1.0"]),  # the defaults: AdamW, clipping
    (["optim.name=sgd"], ["optim.momentum=0.9", "optim.grad_clip=1.0"]),
    (["optim.name=sgd", "optim.momentum=0"], ["optim.grad_clip=1.0"]),
    (["optim.name=sgd", "optim.grad_clip=null"], ["optim.momentum=0.9"]),
])
def test_scaffold_needs_plain_sgd_local_steps(overrides, named):
    """Option II's variate (w_global - y) / (K lr) estimates the mean corrected gradient only for
    plain SGD steps: with AdamW it is Adam's normalised step, with momentum up to 10x too large,
    with clipping a mean of clipped gradients. Such configs are refused, naming what to set."""
    with pytest.raises(ConfigError, match="client.algorithm") as refused:
        load_config(None, ["client.algorithm=scaffold", *overrides])
    message = str(refused.value)
    assert "optim.name=sgd optim.momentum=0 optim.grad_clip=null" in message
    assert all(item in message for item in named), message
    cfg = load_config(None, ["client.algorithm=scaffold", "optim.name=sgd", "optim.momentum=0",
                             "optim.grad_clip=null"])
    assert cfg.client.algorithm == "scaffold"


