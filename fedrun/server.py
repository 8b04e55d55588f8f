"""Server strategies: what the server does with the averaged client update.

Every rank holds the same global vector and applies the same step to the same reduced update,
so no broadcast is needed afterwards. A strategy's state must be in ``state_dict`` so a resumed
run continues exactly.
"""

from __future__ import annotations

from typing import Dict

import torch

from fedrun.config import EMAConfig, ServerConfig
from fedrun.registry import Registry

STRATEGIES: Registry = Registry("server strategy", "server.strategy")


class ServerStrategy:
    """What the server does with the reduced round: ``step(weights, update_sum, total_weight)``
    changes ``weights`` in place (every rank runs it identically on the same reduced sum, so no
    broadcast is needed). Built from the ``server`` config section; its state must be in
    ``state_dict`` so a resumed run continues exactly. Register a subclass with
    ``@STRATEGIES.register("name")`` to make ``server.strategy=name`` valid."""

    #: server.lr when the config leaves it null
    default_lr: float = 1.0

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.lr = self.default_lr if cfg.lr is None else cfg.lr

    def step(self, weights: torch.Tensor, update_sum: torch.Tensor, total_weight: float = 1.0) -> None:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        del state


@STRATEGIES.register("fedavg")
class FedAvg(ServerStrategy):
    """w <- w + lr * sum(n_c delta_c) / sum(n_c). With lr = 1 the new model is the weighted mean
    of the clients'.

    The division by the total weight is folded into the update's one pass over the parameters
    (``alpha``) instead of materialising the mean first: on CPU a separate pass costs as much
    as a good part of the all-reduce itself (docs/benchmarks).
    """

    def step(self, weights: torch.Tensor, update_sum: torch.Tensor, total_weight: float = 1.0) -> None:
        weights.add_(update_sum, alpha=self.lr / total_weight)


@STRATEGIES.register("fedavgm")
class FedAvgM(FedAvg):
    """Server momentum (Hsu et al. 2019): v <- beta v + update; w <- w + lr v."""

    def __init__(self, cfg: ServerConfig):
        super().__init__(cfg)
        self.momentum = cfg.momentum
        self.velocity: torch.Tensor | None = None

    def step(self, weights: torch.Tensor, update_sum: torch.Tensor, total_weight: float = 1.0) -> None:
        if self.velocity is None:
            self.velocity = torch.zeros_like(weights)
        self.velocity.mul_(self.momentum).add_(update_sum, alpha=1.0 / total_weight)
        weights.add_(self.velocity, alpha=self.lr)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.velocity = state.get("velocity")


class Adaptive(ServerStrategy):
    """The adaptive server optimizers of Reddi et al. (2021), "Adaptive Federated Optimization",
    Algorithm 2, on the mean update d = sum(n_c delta_c) / sum(n_c) (the pseudo-gradient is -d):

        m <- beta1 m + (1 - beta1) d                      (m starts at 0)
        v <- second_moment(v, d)                          (v starts at tau^2)
        w <- w + lr m / (sqrt(v) + tau)

    with no bias correction, as in the paper. Subclasses define ``second_moment``. State: m, v
    (checkpointed; a resumed run continues exactly).
    """

    default_lr = 0.01

    def __init__(self, cfg: ServerConfig):
        super().__init__(cfg)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self._scratch: torch.Tensor | None = None

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        """Update v in place from d2 = d * d."""
        raise NotImplementedError

    def step(self, weights: torch.Tensor, update_sum: torch.Tensor, total_weight: float = 1.0) -> None:
        if self.m is None:
            self.m = torch.zeros_like(weights)
            self.v = torch.full_like(weights, self.cfg.tau ** 2)
            self._scratch = torch.empty_like(weights)
        beta1, tau = self.cfg.beta1, self.cfg.tau
        d = torch.mul(update_sum, 1.0 / total_weight, out=self._scratch)
        self.m.mul_(beta1).add_(d, alpha=1 - beta1)
        self.second_moment(self.v, d.mul_(d))
        denom = torch.sqrt(self.v, out=self._scratch).add_(tau)
        weights.addcdiv_(self.m, denom, value=self.lr)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {} if self.m is None else {"m": self.m, "v": self.v}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if "m" in state:
            self.m, self.v = state["m"].clone(), state["v"].clone()
            self._scratch = torch.empty_like(self.m)


@STRATEGIES.register("fedadam")
class FedAdam(Adaptive):
    """v <- beta2 v + (1 - beta2) d^2."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.mul_(self.cfg.beta2).add_(d2, alpha=1 - self.cfg.beta2)


@STRATEGIES.register("fedyogi")
class FedYogi(Adaptive):
    """v <- v - (1 - beta2) d^2 sign(v - d^2) (Zaheer et al. 2018): v changes additively, so it
    does not forget a large past update as fast as Adam's."""

    _sign: torch.Tensor | None = None  # reused scratch of sign(v - d^2)

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        if self._sign is None or self._sign.shape != v.shape:
            self._sign = torch.empty_like(v)
        sign = torch.sub(v, d2, out=self._sign).sign_()
        v.addcmul_(d2, sign, value=-(1 - self.cfg.beta2))


@STRATEGIES.register("fedadagrad")
class FedAdagrad(Adaptive):
    """v <- v + d^2 (server.beta2 is unused)."""

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.add_(d2)


def build_server(cfg: ServerConfig) -> ServerStrategy:
    """The registered strategy ``server.strategy``, built from the ``server`` section."""
    return STRATEGIES.get(cfg.strategy)(cfg)


class EMA:
    """Exponential moving average of the global weights, updated once per round.

    Update r (0-based) uses the decay min(decay, r / (r + 1)): until the average spans its
    horizon it is the running mean of every round's weights so far (the random initialisation
    gets weight 0), then it decays by ``decay`` per round. The warm-up therefore ends after
    ceil(decay / (1 - decay)) updates, whatever the run's length.

    The horizon is the mean age of what the average holds, ages counted in rounds since the
    weights were produced (the last round's weights have age 0). A constant decay d gives
    weights (1 - d) d^a to age a, whose mean age is d / (1 - d) rounds; the warm-up's running
    mean of m rounds has mean age (m - 1) / 2 < d / (1 - d), and every later update moves the
    mean age a to d (a + 1), so it rises monotonically towards d / (1 - d) and never exceeds it.
    ``fedrun compare`` sets d = H / (H + S) for a horizon of H samples at S samples per round
    (d / (1 - d) rounds = H samples).

    (diffusers' EMAModel warms up as min(decay, (1 + r) / (10 + r)) per step; per round that cap
    stays below a decay of 0.975 for 350 rounds, and its mean age is about a tenth of the run
    whatever the decay, so a per-round decay would have no effect in runs of a few hundred
    rounds.)
    """

    def __init__(self, weights: torch.Tensor, cfg: EMAConfig):
        self.cfg = cfg
        self.shadow = weights.detach().clone()
        self.updates = 0

    def decay_at(self, updates: int) -> float:
        return min(self.cfg.decay, updates / (updates + 1))

    def update(self, weights: torch.Tensor) -> None:
        if not self.cfg.enabled:
            self.shadow.copy_(weights)
            return
        decay = self.decay_at(self.updates)
        self.shadow.mul_(decay).add_(weights, alpha=1 - decay)
        self.updates += 1
