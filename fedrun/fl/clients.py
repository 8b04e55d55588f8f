"""The client-algorithm seam: what a sampled client does with the global weights.

A *client algorithm* (``client.algorithm``, registered in ``fedrun.registry.CLIENT_ALGORITHMS``)
runs a client's local steps from the global weights: ``fedavg`` runs ``local_steps`` steps of the
client optimizer (``optim.name``: AdamW or SGD; fresh, or the client's own with
``client.stateful_optimizer``), ``fedprox`` adds a proximal gradient, ``scaffold`` a
control-variate correction. An algorithm sees the global vector and its own persistent state (the
client state store, ``fedrun.engine.client_state``), may add segments to the round's flat buffer
(still ONE all-reduce per round) and keeps server-side state of its own (``server_update``,
checkpointed through ``state_dict``). Its parameters are a ``Params`` dataclass next to it (keys
of the ``client`` section: ``client.prox_mu``); ``check_config`` may refuse a config it cannot
run correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch

from fedrun.errors import ConfigError
from fedrun.fl.local import ClientJob, ClientResult, GradHook, _views, train_client
from fedrun.registry import CLIENT_ALGORITHMS, require

if TYPE_CHECKING:
    from fedrun.config import Config
    from fedrun.engine.flat import FlatParameters
    from fedrun.fl.aggregation.buffer import RoundResult, Segment


@dataclass
class GradTerm:
    """What a client algorithm adds to every local step's gradient, before clipping:
    ``mu (w - anchor) + offset`` (FedProx's proximal gradient: mu and the global weights;
    SCAFFOLD's correction c - c_i: an offset). Sequential clients add it in a gradient hook
    (``hook``); vectorized clients (``fedrun.fl.vectorized``) add a group's terms at once."""

    mu: float = 0.0
    anchor: Optional[torch.Tensor] = None  # flat [P], read when mu > 0
    offset: Optional[torch.Tensor] = None  # flat [P]

    def hook(self, params: List[torch.nn.Parameter]) -> Optional[GradHook]:
        """The gradient hook adding this term to ``params``' gradients (None: it adds nothing)."""
        anchor = _views(self.anchor, params) if self.mu > 0 else None
        offset = _views(self.offset, params) if self.offset is not None else None
        if anchor is None and offset is None:
            return None

        def add(params: List[torch.nn.Parameter]) -> None:
            grads = [p.grad for p in params]
            if anchor is not None:
                torch._foreach_add_(grads, torch._foreach_sub([p.detach() for p in params], anchor),
                                    alpha=self.mu)
            if offset is not None:
                torch._foreach_add_(grads, offset)

        return add


class ClientAlgorithm:
    """Base class of client algorithms; ``name`` is set by ``@CLIENT_ALGORITHMS.register``.

    ``train`` is the client optimizer's local steps with the algorithm's ``grad_term`` added to
    every gradient, then ``finish`` (segments, state). An algorithm that does only that is
    ``vectorizable``: vectorized clients (``client.vectorize``) run the three parts for a group."""

    name: str = "client_algorithm"
    #: Keeps per-client state across rounds in the client state store (``job.state``).
    stateful: bool = False
    #: Its local steps are ``train``'s (the optimizer's steps plus ``grad_term``), which
    #: vectorized clients (``fedrun.fl.vectorized``) run for a group at once instead.
    vectorizable: bool = False

    def __init__(self, cfg: "Config", params: Any = None):
        self.cfg = cfg
        self.params = params  # this algorithm's Params from the client section (None: none)
        # client.stateful_optimizer makes any algorithm keep state (its optimizer's)
        self.stateful = type(self).stateful or cfg.client.stateful_optimizer

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        """Refuse a config this algorithm cannot run correctly (ConfigError naming the key)."""

    def train_steps(self, job: ClientJob, grad_hook: Optional[GradHook] = None) -> ClientResult:
        """The local steps of ``job`` with the client optimizer, fresh or (with
        client.stateful_optimizer) continued from the client's stored optimizer state, which
        then comes back in ``ClientResult.state``."""
        keep = self.cfg.client.stateful_optimizer
        return train_client(job.model, job.params.params, job.loss, job.batches, job.generator,
                            job.optim, job.device, job.precision, grad_hook=grad_hook,
                            optimizer_in=job.state if keep else None, keep_optimizer=keep)

    def segments(self, params: "FlatParameters") -> List["Segment"]:
        """Extra segments of the round buffer this algorithm fills (each summed unweighted over
        the round's clients and available in ``RoundResult.segments``)."""
        return []

    def grad_term(self, job: ClientJob) -> Optional["GradTerm"]:
        """What this algorithm adds to each of ``job``'s local gradients (None: nothing)."""
        return None

    def finish(self, job: ClientJob, result: ClientResult, term: Optional["GradTerm"]) -> ClientResult:
        """After the local steps (``job.params`` holds the client's final weights): the
        algorithm's segments and state in ``result``."""
        return result

    def train(self, job: ClientJob) -> ClientResult:
        """The client optimizer's local steps with ``grad_term`` added to every gradient, then
        ``finish``. Vectorized clients run the same three parts, the steps for a group at once."""
        term = self.grad_term(job)
        hook = term.hook(job.params.params) if term is not None else None
        return self.finish(job, self.train_steps(job, grad_hook=hook), term)

    def server_update(self, result: "RoundResult") -> None:
        """After the all-reduce, on every rank: update the algorithm's server-side state."""

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Server-side state (checkpointed)."""
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        del state


@CLIENT_ALGORITHMS.register("fedavg")
class FedAvgClient(ClientAlgorithm):
    """FedAvg's client (McMahan et al. 2017): local steps of the client optimizer from w."""

    vectorizable = True


@CLIENT_ALGORITHMS.register("fedprox")
class FedProxClient(ClientAlgorithm):
    """FedProx (Li et al. 2020): the local objective adds mu/2 ||w - w_global||^2
    (``client.prox_mu``), i.e. mu (w - w_global) is added to every step's gradient (before
    clipping). The reported loss is the task's loss alone. mu = 0 is FedAvg."""

    @dataclass
    class Params:
        prox_mu: float = 0.01
        """The proximal coefficient mu in mu/2 ||w - w_global||^2."""

        def __post_init__(self) -> None:
            require(self.prox_mu >= 0, "prox_mu", f"must be >= 0, got {self.prox_mu}")

    vectorizable = True

    def grad_term(self, job: ClientJob) -> Optional[GradTerm]:
        return GradTerm(mu=self.params.prox_mu, anchor=job.global_weights) if self.params.prox_mu > 0 else None


@CLIENT_ALGORITHMS.register("scaffold")
class ScaffoldClient(ClientAlgorithm):
    """SCAFFOLD (Karimireddy et al. 2020) with option II control variates.

    Server variate c (this object's state, the same on every rank), client variate c_i (the
    client state store; 0 before a client's first round). Client i, from y = w_global, takes K
    steps with the gradient corrected to g(y) - c_i + c, then

        c_i+ = c_i - c + (w_global - y) / (K lr)          (option II)

    and sends delta_y = y - w_global (the weighted update) and delta_c = c_i+ - c_i (the
    'control' segment of the SAME all-reduce buffer: no second collective). The server then sets
    w <- w + server step(mean delta_y) and c <- c + sum(delta_c) / num_clients.

    Option II's formula reads the K steps as plain SGD steps of size lr, as in the paper:
    ``check_config`` refuses AdamW, momentum and gradient clipping, under which the variate is not
    the mean corrected gradient.
    """

    stateful = True
    vectorizable = True

    def __init__(self, cfg: "Config", params: Any = None):
        super().__init__(cfg, params)
        self.control: Optional[torch.Tensor] = None  # the server variate c

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        """Option II's variate (w_global - y) / (K lr) is the mean corrected gradient only when
        the K local steps are plain SGD steps of size lr: AdamW makes it the mean normalised
        step (about +-1 per coordinate), momentum scales it by up to 1 / (1 - momentum), and
        gradient clipping turns it into a mean of clipped gradients."""
        bad = [f"optim.{key}={value}" for key, value, wanted in (
            ("name", cfg.optim.name, "sgd"), ("momentum", cfg.optim.momentum, 0.0),
            ("grad_clip", cfg.optim.grad_clip, None)) if value != wanted]
        if bad:
            raise ConfigError(
                "config key 'client.algorithm': 'scaffold' (option II control variates) needs plain "
                "SGD local steps: set optim.name=sgd optim.momentum=0 optim.grad_clip=null (got "
                + ", ".join(bad) + "); its variate (w_global - y) / (K lr) estimates the mean "
                "gradient only then")

    def _server_control(self, like: torch.Tensor) -> torch.Tensor:
        """c, on ``like``'s device (zeros before the first round)."""
        if self.control is None or self.control.numel() != like.numel():
            self.control = torch.zeros_like(like)
        self.control = self.control.to(like.device)
        return self.control

    def segments(self, params: "FlatParameters") -> List["Segment"]:
        from fedrun.fl.aggregation.buffer import Segment

        # exact grid: magnitude ~1 (reference None): delta_c is an average gradient, not a
        # weight, and its scale does not follow the weights'.
        return [Segment("control", params.numel)]

    def _client_control(self, job: ClientJob) -> torch.Tensor:
        """c_i (zeros before the client's first round)."""
        if job.state is not None and "control" in job.state:
            return job.state["control"].to(job.device)
        return torch.zeros_like(self._server_control(job.global_weights))

    def grad_term(self, job: ClientJob) -> GradTerm:
        return GradTerm(offset=self._server_control(job.global_weights) - self._client_control(job))

    def finish(self, job: ClientJob, result: ClientResult, term: Optional[GradTerm]) -> ClientResult:
        steps = len(job.batches)
        new_c = (job.global_weights - job.params.flat).div_(steps * job.optim.lr).sub_(term.offset)
        result.segments = {"control": new_c - self._client_control(job)}
        result.state = {**(result.state or {}), "control": new_c}
        return result

    def server_update(self, result: "RoundResult") -> None:
        delta = result.segments["control"]
        self._server_control(delta).add_(delta, alpha=1.0 / self.cfg.num_clients)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {} if self.control is None else {"control": self.control}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        if "control" in state:
            self.control = state["control"].clone()


def build_client_algorithm(cfg: "Config") -> ClientAlgorithm:
    name = cfg.client.algorithm
    return CLIENT_ALGORITHMS.get(name)(cfg, CLIENT_ALGORITHMS.build_params(name, cfg.client))
