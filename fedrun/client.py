"""Local training of one client, and the client-algorithm seam.

No distributed code here. Everything random a client does (batch order, noise, timesteps) comes
from a generator seeded by (seed, client, round), so the client trains identically whichever
rank runs it: this is what makes results independent of the world size.

A *client algorithm* (``client.algorithm``, registered in ``CLIENT_ALGORITHMS``) is what a
sampled client does for its local steps, starting from the global weights: ``fedavg`` runs
``local_steps`` steps of a fresh AdamW (``optim.*``). An algorithm sees the global vector and
its own persistent state (from the client state store, ``fedrun.client_state``), may add
segments to the round's flat buffer (still ONE all-reduce per round) and keeps server-side state
of its own (``server_update``, checkpointed through ``state_dict``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np
import torch

from fedrun.config import OptimConfig
from fedrun.registry import Registry
from fedrun.rng import derived_generator

if TYPE_CHECKING:
    from fedrun.aggregate import RoundResult, Segment
    from fedrun.config import Config
    from fedrun.flat import FlatParameters

CLIENT_ALGORITHMS: Registry = Registry("client algorithm", "client.algorithm")


def client_generator(seed: int, client: int, global_round: int) -> torch.Generator:
    """The client's private random stream for one round."""
    return derived_generator(seed, client, global_round)


def num_local_steps(num_samples: int, batch_size: int, local_steps: int,
                    local_epochs: float | None) -> int:
    """E, or ceil(epochs * n / B) when the budget is given in local epochs."""
    if local_epochs is None:
        return local_steps
    return max(1, math.ceil(local_epochs * num_samples / batch_size))


def batch_indices(client_indices: np.ndarray, steps: int, batch_size: int,
                  generator: torch.Generator) -> np.ndarray:
    """(steps, batch) sample indices: passes over the client's data in shuffled order, reshuffled
    at each pass, wrapping around as often as needed (also when the client has fewer samples
    than one batch)."""
    needed = steps * batch_size
    passes = math.ceil(needed / len(client_indices))
    order = torch.cat([torch.randperm(len(client_indices), generator=generator) for _ in range(passes)])
    return client_indices[order[:needed].numpy()].reshape(steps, batch_size)


LossFn = Callable[[torch.nn.Module, np.ndarray, torch.Generator], torch.Tensor]


@dataclass
class ClientJob:
    """One client's local work in one round, as the round loop hands it to the algorithm. The
    replica (``model``, whose trainable parameters are ``params``) already holds the global
    weights; the algorithm leaves the client's final weights in it."""

    client: int
    global_round: int
    model: torch.nn.Module
    params: "FlatParameters"
    global_weights: torch.Tensor  # read-only
    batches: np.ndarray  # (steps, batch) sample indices
    generator: torch.Generator  # the client's (seed, client, round) stream
    loss: LossFn  # loss(model, indices, generator), the task's
    optim: OptimConfig
    device: torch.device
    precision: str = "fp32"  # autocast of the forward pass (config key `precision`)
    state: Optional[Dict[str, torch.Tensor]] = None  # persistent state (stateful algorithms)


@dataclass
class ClientResult:
    mean_loss: float
    samples: int  # samples processed (steps x batch)
    segments: Dict[str, torch.Tensor] = field(default_factory=dict)  # added to the round buffer
    state: Optional[Dict[str, torch.Tensor]] = None  # new persistent state, stored for next time


class ClientAlgorithm:
    """Base class of client algorithms; ``name`` is set by ``@CLIENT_ALGORITHMS.register``."""

    name: str = "client_algorithm"
    #: Keeps per-client state across rounds in the client state store (``job.state``).
    stateful: bool = False

    def __init__(self, cfg: "Config"):
        self.cfg = cfg

    def segments(self, params: "FlatParameters") -> List["Segment"]:
        """Extra segments of the round buffer this algorithm fills (each summed unweighted over
        the round's clients and available in ``RoundResult.segments``)."""
        return []

    def train(self, job: ClientJob) -> ClientResult:
        raise NotImplementedError

    def server_update(self, result: "RoundResult") -> None:
        """After the all-reduce, on every rank: update the algorithm's server-side state."""

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Server-side state (checkpointed)."""
        return {}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        del state


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    from fedrun.errors import ConfigError

    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("config key 'precision': fp16 needs a GPU (its gradient scaler guards "
                          "CUDA half precision); use precision=bf16 on CPU")


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast context for ``precision`` (a no-op for fp32). Parameters,
    gradients and the optimizer stay fp32: only the compute runs in lower precision."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def train_client(model, params, loss_fn: LossFn, batches: np.ndarray, generator: torch.Generator,
                 optim: OptimConfig, device: torch.device, precision: str = "fp32") -> ClientResult:
    """Run one optimizer step per row of ``batches`` on ``model`` (already holding the global
    weights); ``loss_fn(model, batch_indices, generator)`` is the task's loss. A fresh AdamW per
    call: client optimizer state does not persist across rounds. ``precision``: the forward runs
    under autocast (bf16, fp16), fp16 with a fresh gradient scaler (as fresh as the optimizer)."""
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                  weight_decay=optim.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model.train()
    loss_sum = torch.zeros((), device=device)
    for step_indices in batches:
        with autocast(device, precision):
            loss = loss_fn(model, step_indices, generator)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            if optim.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            if optim.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        loss_sum += loss.detach().float()
    # One host sync per client, not per step.
    return ClientResult(mean_loss=float(loss_sum) / len(batches), samples=int(batches.size))


@CLIENT_ALGORITHMS.register("fedavg")
class FedAvgClient(ClientAlgorithm):
    """FedAvg's client (McMahan et al. 2017): local steps of a fresh optimizer from w."""

    def train(self, job: ClientJob) -> ClientResult:
        return train_client(job.model, job.params.params, job.loss, job.batches, job.generator,
                            job.optim, job.device, job.precision)


def build_client_algorithm(cfg: "Config") -> ClientAlgorithm:
    return CLIENT_ALGORITHMS.get(cfg.client.algorithm)(cfg)
