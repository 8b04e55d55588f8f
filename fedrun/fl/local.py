"""Local training of one client: its batches, its optimizer, its steps.

No distributed code here. Everything random a client does (batch order, noise, timesteps) comes
from a generator seeded by (seed, client, round), so the client trains identically whichever
rank runs it: this is what makes results independent of the world size. The client algorithms
(``fedrun.fl.clients``) call ``train_client`` with their own gradient hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import numpy as np
import torch

from fedrun.rng import derived_generator

if TYPE_CHECKING:
    from fedrun.config import OptimConfig
    from fedrun.engine.flat import FlatParameters


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


def build_optimizer(params: List[torch.nn.Parameter], optim: OptimConfig,
                    fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """The client optimizer ``optim.name``: AdamW (betas) or SGD (momentum), with weight decay.
    ``fused``: torch's fused kernel (one pass per tensor; the same update up to rounding), as
    vectorized clients use it on their stacked tensors; None = torch's default."""
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum,
                               weight_decay=optim.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                             weight_decay=optim.weight_decay, fused=fused)


OPTIM_PREFIX = "optim."


def optimizer_state(optimizer: torch.optim.Optimizer,
                    params: List[torch.nn.Parameter]) -> Dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors ('optim.exp_avg': P floats, ...; a
    scalar such as AdamW's 'step' once): what the client state store keeps between rounds."""
    first = optimizer.state.get(params[0], {})
    out: Dict[str, torch.Tensor] = {}
    for key, value in first.items():
        if not torch.is_tensor(value):
            continue
        if value.shape == params[0].shape:
            out[OPTIM_PREFIX + key] = torch.cat([
                optimizer.state[p][key].reshape(-1) if key in optimizer.state.get(p, {})
                else torch.zeros(p.numel(), dtype=value.dtype, device=value.device) for p in params])
        else:
            out[OPTIM_PREFIX + key] = value.detach().clone().reshape(1)
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: List[torch.nn.Parameter],
                         state: Dict[str, torch.Tensor]) -> None:
    """Seat the flat state of ``optimizer_state`` back into a fresh optimizer."""
    keys = [k for k in state if k.startswith(OPTIM_PREFIX)]
    if not keys:
        return
    total = sum(p.numel() for p in params)
    values = {key[len(OPTIM_PREFIX):]: state[key].to(params[0].device) for key in keys}
    offset = 0
    for p in params:
        n = p.numel()
        # a per-parameter tensor was stored as P floats, a scalar (AdamW's step) as one
        optimizer.state[p] = {name: (value[offset: offset + n].view_as(p).clone()
                                     if value.numel() == total else value[0].clone())
                              for name, value in values.items()}
        offset += n


#: called after each backward pass with the parameters, before clipping and the step
GradHook = Callable[[List[torch.nn.Parameter]], None]


def train_client(model, params, loss_fn: LossFn, batches: np.ndarray, generator: torch.Generator,
                 optim: OptimConfig, device: torch.device, precision: str = "fp32", *,
                 grad_hook: Optional[GradHook] = None,
                 optimizer_in: Optional[Dict[str, torch.Tensor]] = None,
                 keep_optimizer: bool = False) -> ClientResult:
    """Run one optimizer step per row of ``batches`` on ``model`` (already holding the global
    weights); ``loss_fn(model, batch_indices, generator)`` is the task's loss.

    The optimizer (``optim.name``) is fresh, or continues from ``optimizer_in`` (the client's
    stored state); with ``keep_optimizer`` its final state is returned in ``ClientResult.state``.
    ``grad_hook(params)`` adjusts the gradients after each backward pass, before clipping
    (FedProx's proximal gradient, SCAFFOLD's correction). ``precision``: the forward runs under
    autocast (bf16, fp16), fp16 with a fresh gradient scaler."""
    optimizer = build_optimizer(params, optim)
    if optimizer_in is not None:
        load_optimizer_state(optimizer, params, optimizer_in)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model.train()
    loss_sum = torch.zeros((), device=device)
    for step_indices in batches:
        with autocast(device, precision):
            loss = loss_fn(model, step_indices, generator)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            if grad_hook is not None or optim.grad_clip is not None:
                scaler.unscale_(optimizer)
        if grad_hook is not None:
            grad_hook(params)
        if optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        loss_sum += loss.detach().float()
    # One host sync per client, not per step.
    return ClientResult(mean_loss=float(loss_sum) / len(batches), samples=int(batches.size),
                        state=optimizer_state(optimizer, params) if keep_optimizer else None)


def _views(vector: torch.Tensor, params: List[torch.nn.Parameter]) -> List[torch.Tensor]:
    """``vector`` (flat, P) as views shaped like ``params``."""
    return [part.view_as(p) for part, p in zip(vector.split([p.numel() for p in params]), params)]
