"""Vectorized clients (``client.vectorize`` = G): a group of G clients trains its local steps at
once, with ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``) over their stacked weights.

Many tiny clients (one image each, a few steps) are a batch: G clients' forward and backward
passes run as one batched call, and one optimizer steps the stacked [G, ...] tensors. AdamW and
SGD are elementwise, so one optimizer over the stack equals G separate ones (every client of a
group takes the same number of steps, so the step counts match); gradient clipping
(``optim.grad_clip``) uses each client's own gradient norm.

Randomness stays the client's own: vmap cannot give each client its (seed, client, round)
generator, so everything random a step uses (the batch, the diffusion noise and timesteps) is
drawn outside vmap, client by client, from that generator and in the order the sequential path
draws it (``Task.draw_step``), then passed in batched; the loss of the drawn inputs
(``Task.step_loss``) is what vmap differentiates. The resulting weights equal the sequential
path's up to fp32 rounding (the batched kernels sum in another order).

With ``client.stateful_optimizer`` each client continues its own AdamW state (moments and step
count) from the client state store. torch's AdamW keeps one step count per tensor, and the
clients of a group have trained different numbers of rounds, so their bias corrections differ:
``StackedAdamW`` steps the group's [G, P] moments with each row's own step count, torch's
AdamW update (decoupled weight decay, bias-corrected moments) row by row in a few whole-buffer
operations. Plain SGD (momentum 0) keeps no state; SGD with momentum is refused for stateful
vectorized clients (a fresh client's first step starts its buffer differently).

Each client's final weights then go, one by one, through the same path as a sequential client
(uplink codec, update transforms such as DP clipping, the exact sum, client state): see
``fedrun.engine.simulator.train_local``. Groups are fixed before clients are dealt to ranks
(``deal_groups``): a group's kernels, and so its clients' results, do not depend on the number
of processes, and the exact sum makes the round independent of which rank ran which group.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from fedrun.engine.cohort import assign_to_ranks
from fedrun.fl.local import build_optimizer

if TYPE_CHECKING:
    from fedrun.config import OptimConfig
    from fedrun.engine.flat import FlatParameters
    from fedrun.fl.clients import GradTerm

#: one step's drawn inputs: name -> tensor (one client: its own shape; a group: [G, ...])
StepInputs = Dict[str, torch.Tensor]


# ---------------------------------------------------------------- groups and ranks

def client_groups(clients: Sequence[int], steps: Sequence[int], group_size: int) -> List[List[int]]:
    """The clients in groups of at most ``group_size`` that take the same number of local steps
    (``steps[i]`` is ``clients[i]``'s): sorted by (steps, client), cut into consecutive chunks
    within each step count, so only a step count's last group may be smaller.

    Cutting a union of whole groups again gives back those groups (each step count's full
    groups come first, its smaller one last), so a rank can regroup the clients dealt to it."""
    if group_size < 1:
        raise ValueError(f"group size must be >= 1, got {group_size}")
    by_steps: Dict[int, List[int]] = {}
    for client, count in sorted(zip(clients, steps), key=lambda pair: (pair[1], pair[0])):
        by_steps.setdefault(count, []).append(client)
    return [members[i: i + group_size] for _, members in sorted(by_steps.items())
            for i in range(0, len(members), group_size)]


def deal_groups(clients: Sequence[int], steps: Sequence[int], group_size: int,
                world_size: int) -> List[List[int]]:
    """Each rank's clients (sorted), dealt in whole groups (``client_groups``) balancing the
    steps: the groups do not depend on ``world_size``."""
    groups = client_groups(clients, steps, group_size)
    cost = dict(zip(clients, steps))
    dealt = assign_to_ranks(list(range(len(groups))), world_size,
                            [sum(cost[c] for c in group) for group in groups])
    return [sorted(c for index in indices for c in groups[index]) for indices in dealt]


# ---------------------------------------------------------------- inputs

def stack_steps(per_client: Sequence[Sequence[StepInputs]]) -> List[StepInputs]:
    """Per client a list of its steps' inputs -> per step the inputs stacked over the clients
    ([G, ...] each)."""
    steps = {len(draws) for draws in per_client}
    if len(steps) != 1:
        raise ValueError(f"the clients of a group must take the same number of steps, got {sorted(steps)}")
    return [{name: torch.stack([draws[step][name] for draws in per_client])
             for name in per_client[0][step]} for step in range(steps.pop())]


# ---------------------------------------------------------------- training

def clip_per_client_(grads: List[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale each client's gradients (row g of every [G, ...] tensor) to L2 norm at most
    ``max_norm`` over all its parameters, as ``torch.nn.utils.clip_grad_norm_`` does for one
    client (coefficient max_norm / (norm + 1e-6), capped at 1). Returns the norms before."""
    groups = grads[0].shape[0]
    per_tensor = torch.stack([torch.linalg.vector_norm(g.reshape(groups, -1), dim=1) for g in grads], dim=1)
    norms = torch.linalg.vector_norm(per_tensor, dim=1)
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(groups, *([1] * (g.dim() - 1))))
    return norms


OPTIM_KEYS = ("optim.exp_avg", "optim.exp_avg_sq", "optim.step")  # AdamW's, as optimizer_state stores them


class StackedAdamW:
    """AdamW over a group's flat weights [G, P] whose rows continue their own states: moments
    [G, P] and step counts [G]. The update is torch's ``AdamW`` (``_single_tensor_adamw``,
    its default on CPU) for each row: weight decay ``p *= 1 - lr wd``, ``m = lerp(m, g, 1 - b1)``,
    ``v = b2 v + (1 - b2) g^2``, ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``
    with t the row's step count, the corrections computed in float64 as torch computes them in
    Python floats. The states are the client store's (``fedrun.fl.local.optimizer_state``):
    'optim.exp_avg' and 'optim.exp_avg_sq' of P floats, 'optim.step' one float; None = fresh."""

    def __init__(self, flat: torch.Tensor, optim: "OptimConfig",
                 states: Sequence[Optional[Dict[str, torch.Tensor]]]):
        self.flat, self.optim = flat, optim
        self.lr, (self.beta1, self.beta2) = optim.lr, optim.betas
        self.eps = 1e-8  # torch.optim.AdamW's default, as build_optimizer leaves it
        rows = flat.shape[0]
        self.exp_avg = torch.zeros_like(flat)
        self.exp_avg_sq = torch.zeros_like(flat)
        self.steps = torch.zeros(rows, dtype=torch.float64)
        for row, state in enumerate(states):
            if not state:
                continue
            if any(key not in state for key in OPTIM_KEYS):
                raise ValueError(f"a stored client optimizer state lacks {[k for k in OPTIM_KEYS if k not in state]} "
                                 f"(has {sorted(state)}): not an AdamW state")
            self.exp_avg[row].copy_(state["optim.exp_avg"].reshape(-1))
            self.exp_avg_sq[row].copy_(state["optim.exp_avg_sq"].reshape(-1))
            self.steps[row] = float(state["optim.step"].reshape(-1)[0])

    def step(self, grad: torch.Tensor) -> None:
        """One step of every row with the gradients ``grad`` [G, P]."""
        self.steps += 1
        column = lambda values: values.to(self.flat.dtype).view(-1, 1)  # noqa: E731
        step_size = column(self.lr / (1 - self.beta1 ** self.steps))
        correction2_sqrt = column((1 - self.beta2 ** self.steps).sqrt())
        if self.optim.weight_decay:
            self.flat.mul_(1 - self.lr * self.optim.weight_decay)
        self.exp_avg.lerp_(grad, 1 - self.beta1)
        self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
        denom = (self.exp_avg_sq.sqrt() / correction2_sqrt).add_(self.eps)
        self.flat.sub_(self.exp_avg / denom * step_size)

    def states(self) -> List[Dict[str, torch.Tensor]]:
        """Each row's state as the client store keeps it (fresh tensors)."""
        return [{"optim.exp_avg": self.exp_avg[row].clone(), "optim.exp_avg_sq": self.exp_avg_sq[row].clone(),
                 "optim.step": torch.tensor([float(self.steps[row])], dtype=torch.float32)}
                for row in range(self.flat.shape[0])]


class GroupTrainer:
    """Trains the local steps of a group of clients at once.

    ``model`` is a copy of the replica fit for torch.func (``Task.functional_model``); only its
    trainable parameters (``params.names``) are replaced by the clients' stacked weights.
    ``step_loss(model, inputs)`` is the task's loss of one step's drawn inputs
    (``Task.step_loss``), ``model`` there a callable standing for the module."""

    def __init__(self, model: torch.nn.Module, params: "FlatParameters",
                 step_loss: Callable[[Callable, StepInputs], torch.Tensor], optim: "OptimConfig"):
        from torch.func import grad_and_value, vmap

        self.model, self.step_loss, self.optim = model, step_loss, optim
        self.names, self.shapes = list(params.names), list(params.shapes)
        self.model.train()
        self._grads_and_losses = vmap(grad_and_value(self._loss))

    def _loss(self, weights: Dict[str, torch.Tensor], inputs: StepInputs) -> torch.Tensor:
        from torch.func import functional_call

        def model(*args, **kwargs):
            return functional_call(self.model, weights, args, kwargs)

        return self.step_loss(model, inputs)

    def _unflatten(self, starts: torch.Tensor) -> Dict[str, torch.Tensor]:
        """[G, P] -> name -> [G, *shape], fresh contiguous tensors (the optimizer's parameters)."""
        parts = starts.split([shape.numel() for shape in self.shapes], dim=1)
        return {name: part.reshape(starts.shape[0], *shape).clone()
                for name, part, shape in zip(self.names, parts, self.shapes)}

    def _term(self, terms: Sequence[Optional["GradTerm"]]) -> Tuple[float, Optional[List[torch.Tensor]],
                                                                   Optional[List[torch.Tensor]]]:
        """The group's gradient terms (``ClientAlgorithm.grad_term``, one per client) stacked:
        (mu, anchors, offsets), the tensors name by name as [G, *shape] (None: not added)."""
        present = [t for t in terms if t is not None]
        if not present:
            return 0.0, None, None
        if len(present) != len(terms) or len({t.mu for t in present}) != 1 \
                or len({t.offset is None for t in present}) != 1:
            raise ValueError("the clients of a group must add gradient terms of one form (one mu, "
                             "all with or all without an offset)")
        mu = present[0].mu
        anchors = offsets = None
        if mu > 0:
            stacked = self._unflatten(torch.stack([t.anchor for t in present]))
            anchors = [stacked[name] for name in self.names]
        if present[0].offset is not None:
            stacked = self._unflatten(torch.stack([t.offset for t in present]))
            offsets = [stacked[name] for name in self.names]
        return mu, anchors, offsets

    def train(self, starts: torch.Tensor, steps: Sequence[StepInputs],
              terms: Optional[Sequence[Optional["GradTerm"]]] = None,
              states: Optional[Sequence[Optional[Dict[str, torch.Tensor]]]] = None
              ) -> Tuple[torch.Tensor, List[float], Optional[List[Dict[str, torch.Tensor]]]]:
        """From ``starts`` ([G, P]: each client's initial flat weights) one optimizer step per
        item of ``steps`` (each client's drawn inputs, stacked), each client's gradient term
        (``terms``) added to its gradients before clipping, as the sequential hook does. With
        ``states`` (stateful client optimizers: each client's stored state, None = fresh) the
        optimizer continues them. Returns the final weights [G, P], each client's mean loss
        (summed in fp32 and divided as ``train_client`` does) and, with ``states``, each
        client's final optimizer state."""
        weights = self._unflatten(starts)
        tensors = [weights[name] for name in self.names]
        mu, anchors, offsets = self._term(terms or [None] * starts.shape[0])
        if states is None:
            optimizer = build_optimizer(tensors, self.optim, fused=True)  # fresh, as sequentially
        elif self.optim.name == "adamw":
            optimizer = _StackedStep(StackedAdamW(starts.clone(), self.optim, states), tensors)
        elif self.optim.momentum == 0:  # plain SGD keeps no state
            optimizer = build_optimizer(tensors, self.optim, fused=True)
        else:
            raise ValueError("stateful vectorized clients run AdamW or plain SGD (optim.momentum=0)")
        loss_sum = torch.zeros(starts.shape[0], device=starts.device)
        for inputs in steps:
            grads, losses = self._grads_and_losses(weights, inputs)
            for tensor, name in zip(tensors, self.names):
                # vmap may return strided gradients (a convolution's, for one client), which
                # torch's fused CPU optimizers misread: they then step by wrong values
                tensor.grad = grads[name].contiguous()
            if anchors is not None:  # FedProx: mu (w - w_global)
                torch._foreach_add_([t.grad for t in tensors],
                                    torch._foreach_sub([t.detach() for t in tensors], anchors), alpha=mu)
            if offsets is not None:  # SCAFFOLD: c - c_i
                torch._foreach_add_([t.grad for t in tensors], offsets)
            if self.optim.grad_clip is not None:
                clip_per_client_([t.grad for t in tensors], self.optim.grad_clip)
            optimizer.step()
            loss_sum += losses.detach().float()
        final = torch.cat([t.reshape(starts.shape[0], -1) for t in tensors], dim=1)
        kept = None
        if states is not None:
            kept = optimizer.adamw.states() if isinstance(optimizer, _StackedStep) else [{} for _ in states]
        return final, [value / len(steps) for value in loss_sum.tolist()], kept


class _StackedStep:
    """``StackedAdamW`` stepping the group's per-name tensors (their gradients gathered into one
    [G, P] buffer, the new weights written back): an optimizer's ``step()`` for
    ``GroupTrainer.train``."""

    def __init__(self, adamw: StackedAdamW, tensors: List[torch.Tensor]):
        self.adamw, self.tensors = adamw, tensors
        self.sizes = [t[0].numel() for t in tensors]

    @torch.no_grad()
    def step(self) -> None:
        rows = self.adamw.flat.shape[0]
        self.adamw.step(torch.cat([t.grad.reshape(rows, -1) for t in self.tensors], dim=1))
        for tensor, part in zip(self.tensors, self.adamw.flat.split(self.sizes, dim=1)):
            tensor.copy_(part.reshape(tensor.shape))


def draw_client_steps(draw_step: Callable[[np.ndarray, torch.Generator], StepInputs],
                      batches: np.ndarray, generator: torch.Generator) -> List[StepInputs]:
    """One client's inputs for each of its steps (rows of ``batches``), drawn from its generator
    in the order its sequential steps draw them."""
    return [draw_step(indices, generator) for indices in batches]
