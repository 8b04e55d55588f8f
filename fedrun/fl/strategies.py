"""Server strategies: what the server does with the averaged client update.

Every rank holds the same global vector and applies the same step to the same reduced update,
so no broadcast is needed afterwards. A strategy's state must be in ``state_dict`` so a resumed
run continues exactly. A strategy's own parameters are its ``Params`` dataclass: keys of the
``server`` section beside ``server.strategy`` and ``server.lr`` (``server.momentum`` for fedavgm;
``server.beta1``, ``beta2``, ``tau`` for the adaptive ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from fedrun.registry import STRATEGIES, require


class ServerStrategy:
    """What the server does with the reduced round: ``step(weights, update_sum, total_weight)``
    changes ``weights`` in place (every rank runs it identically on the same reduced sum, so no
    broadcast is needed). Register a subclass with ``@STRATEGIES.register("name")`` to make
    ``server.strategy=name`` valid; give it a ``Params`` dataclass for parameters of its own
    (``build_server`` passes them in)."""

    #: server.lr when the config leaves it null
    default_lr: float = 1.0

    def __init__(self, lr: Optional[float] = None, params: Any = None):
        self.lr = self.default_lr if lr is None else lr
        self.params = params

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
    """Server momentum (Hsu et al. 2019): v <- momentum v + update; w <- w + lr v."""

    @dataclass
    class Params:
        momentum: float = 0.9
        """Server momentum (Hsu et al. 2019)."""

        def __post_init__(self) -> None:
            require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")

    def __init__(self, lr: Optional[float] = None, params: Optional["FedAvgM.Params"] = None):
        super().__init__(lr, params or FedAvgM.Params())
        self.momentum = self.params.momentum
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


@dataclass
class AdaptiveParams:
    """The adaptive optimizers' parameters (FedAdagrad has no beta2)."""

    beta1: float = 0.9
    """Decay of the first moment of the mean update (0 = none)."""
    tau: float = 1e-3
    """The adaptivity floor tau in lr * m / (sqrt(v) + tau); v starts at tau^2."""

    def __post_init__(self) -> None:
        require(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        require(self.tau > 0, "tau", f"must be > 0, got {self.tau}")


@dataclass
class AdaptiveParams2(AdaptiveParams):
    """FedAdam's and FedYogi's parameters: AdaptiveParams plus the second moment's decay."""

    beta2: float = 0.99
    """Decay of the second moment."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")


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
    Params = AdaptiveParams2

    def __init__(self, lr: Optional[float] = None, params: Any = None):
        super().__init__(lr, params or type(self).Params())
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self._scratch: torch.Tensor | None = None

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        """Update v in place from d2 = d * d."""
        raise NotImplementedError

    def step(self, weights: torch.Tensor, update_sum: torch.Tensor, total_weight: float = 1.0) -> None:
        if self.m is None:
            self.m = torch.zeros_like(weights)
            self.v = torch.full_like(weights, self.params.tau ** 2)
            self._scratch = torch.empty_like(weights)
        beta1, tau = self.params.beta1, self.params.tau
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
        v.mul_(self.params.beta2).add_(d2, alpha=1 - self.params.beta2)


@STRATEGIES.register("fedyogi")
class FedYogi(Adaptive):
    """v <- v - (1 - beta2) d^2 sign(v - d^2) (Zaheer et al. 2018): v changes additively, so it
    does not forget a large past update as fast as Adam's."""

    _sign: torch.Tensor | None = None  # reused scratch of sign(v - d^2)

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        if self._sign is None or self._sign.shape != v.shape:
            self._sign = torch.empty_like(v)
        sign = torch.sub(v, d2, out=self._sign).sign_()
        v.addcmul_(d2, sign, value=-(1 - self.params.beta2))


@STRATEGIES.register("fedadagrad")
class FedAdagrad(Adaptive):
    """v <- v + d^2 (no beta2)."""

    Params = AdaptiveParams

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.add_(d2)


def build_server(server: Any) -> ServerStrategy:
    """The registered strategy ``server.strategy``, built from the ``server`` config section (its
    ``lr`` and the strategy's own parameters)."""
    return STRATEGIES.get(server.strategy)(server.lr, STRATEGIES.build_params(server.strategy, server))
