"""The centralized baseline: the same model, optimizer, learning rate and batch as a federated
client, trained data-parallel (torch DDP, gradients all-reduced every step) on the union of the
clients' data, for a budget in samples matched to a federated run.

    python -m fedrun central --config configs/digits_fedavg.yaml            # 1 process
    torchrun --nproc_per_node=2 -m fedrun central --config configs/digits_fedavg.yaml

Results do not depend on the world size: step s draws its global batch (indices, noise,
timesteps) from a generator seeded by (seed, s) on every rank, and rank k trains on the k-th
slice of it; DDP's average of the slices' gradients is the gradient of the global batch.
Equal up to float rounding, which Adam amplifies over many steps; with ``central.micro_batch``
= batch / W_max every rank count up to W_max (powers of two) computes the same micro-batches
and the results are bit-identical (halving is exact; a sum of two terms does not depend on order).

Steps are grouped in "rounds" of ``central.steps_per_round`` (default K x E: as many samples as a
federated round), the unit of EMA updates, metrics records and the *.every cadences, so central
and federated runs of one config line up round by round in ``metrics.jsonl``.

Bytes communicated are the gradient all-reduce volume of a ring all-reduce over W ranks:
each step every rank sends (and receives) 2 (W - 1) / W x 4 P bytes, P = trainable parameters,
so one step moves 2 (W - 1) x 4 P bytes in total (0 with one process).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch

from fedrun import dist
from fedrun.client import batch_indices, diffusion_loss, num_local_steps
from fedrun.config import Config
from fedrun.errors import CheckpointError, ConfigError
from fedrun.logging import RunLogger
from fedrun.simulator import (BYTES_PER_FLOAT, Federation, default_task, drive, open_run, setup,
                              write_outputs)

_STREAM = 0xCE47  # keeps the central batch stream apart from the clients' (seed, client, round)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of global step ``step`` (same on every rank)."""
    state = np.random.SeedSequence([seed, _STREAM, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def federated_steps_per_round(cfg: Config, client_sizes) -> int:
    """K x E: optimizer steps of one federated round (with local_epochs, the mean over clients
    scaled to the cohort)."""
    steps = [num_local_steps(n, cfg.optim.batch_size, cfg.local_steps, cfg.local_epochs)
             for n in client_sizes]
    return max(1, round(sum(steps) * cfg.cohort_size / len(steps)))


def plan(cfg: Config, client_sizes) -> dict:
    """Global batch, steps per round, total steps and rounds of the central run of ``cfg``."""
    batch = cfg.central.batch_size or cfg.optim.batch_size
    fed_steps = federated_steps_per_round(cfg, client_sizes)
    per_round = cfg.central.steps_per_round or fed_steps
    if cfg.central.samples is None:  # the federated budget: rounds x K x E x B
        samples = cfg.rounds * fed_steps * cfg.optim.batch_size
    else:
        samples = cfg.central.samples
    total_steps = max(1, samples // batch)
    return {"batch": batch, "steps_per_round": per_round, "total_steps": total_steps,
            "rounds": math.ceil(total_steps / per_round)}


class CentralTrainer:
    """One replica wrapped in DDP and one AdamW that lives for the whole run."""

    def __init__(self, fed: Federation, schedule: dict):
        cfg = fed.cfg
        self.fed = fed
        self.batch = schedule["batch"]
        if self.batch % fed.world_size:
            raise ConfigError(f"config key 'central.batch_size': the global batch {self.batch} must "
                              f"be divisible by the number of ranks ({fed.world_size})")
        self.slice = slice(fed.rank * self.batch // fed.world_size,
                           (fed.rank + 1) * self.batch // fed.world_size)
        slice_size = self.batch // fed.world_size
        self.micro = min(cfg.central.micro_batch or slice_size, slice_size)
        if slice_size % self.micro:
            raise ConfigError(f"config key 'central.micro_batch': {self.micro} does not divide a "
                              f"rank's slice of the global batch ({slice_size})")
        self.union = np.sort(np.concatenate(fed.client_indices))  # the clients' data, pooled
        fed.params.load_(fed.global_weights)
        self.model = dist.data_parallel(fed.model)
        self.optimizer = torch.optim.AdamW(fed.params.params, lr=cfg.optim.lr,
                                           betas=tuple(cfg.optim.betas),
                                           weight_decay=cfg.optim.weight_decay)
        self.step_bytes = 2 * (fed.world_size - 1) * BYTES_PER_FLOAT * fed.params.numel

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step on this rank's slice of global batch ``step``; returns the slice's
        summed loss (for the round's mean)."""
        fed, cfg = self.fed, self.fed.cfg
        generator = step_generator(cfg.seed, step)
        indices = batch_indices(self.union, 1, self.batch, generator)[0]
        shape = (self.batch, fed.dataset.num_channels, fed.dataset.image_size, fed.dataset.image_size)
        noise = torch.randn(shape, generator=generator)
        timesteps = torch.randint(0, fed.noise_scheduler.config.num_train_timesteps, (self.batch,),
                                  generator=generator)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        starts = range(self.slice.start, self.slice.stop, self.micro)
        loss_sum = torch.zeros((), device=fed.device)
        for i, start in enumerate(starts):
            part = slice(start, start + self.micro)
            images = fed.dataset.get_batch(indices[part]).to(fed.device)
            # The last micro-batch's backward all-reduces (averages) the accumulated gradients.
            sync = i == len(starts) - 1
            with (contextlib.nullcontext() if sync else dist.no_sync(self.model)):
                loss = diffusion_loss(self.model, fed.noise_scheduler, images, None,
                                      noise=noise[part], timesteps=timesteps[part])
                (loss / len(starts)).backward()  # the slice's mean loss
            loss_sum += loss.detach() * self.micro
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(fed.params.params, cfg.optim.grad_clip)
        self.optimizer.step()
        return loss_sum

    # The optimizer state is part of the resumable state (it persists across steps here).
    def optimizer_groups(self) -> dict:
        params = self.fed.params
        state = [self.optimizer.state.get(p, {}) for p in params.params]
        if not state[0]:
            return {}
        flat = lambda key: torch.cat([s[key].reshape(-1) for s in state])  # noqa: E731
        return {"optimizer": {"exp_avg": flat("exp_avg"), "exp_avg_sq": flat("exp_avg_sq"),
                              "step": torch.tensor([float(state[0]["step"])])}}

    def load_optimizer(self, group: dict) -> None:
        offset = 0
        for param in self.fed.params.params:
            n = param.numel()
            self.optimizer.state[param] = {
                "step": group["step"][0].clone(),
                "exp_avg": group["exp_avg"][offset: offset + n].view_as(param).clone(),
                "exp_avg_sq": group["exp_avg_sq"][offset: offset + n].view_as(param).clone(),
            }
            offset += n


def run_central(cfg: Config, task=None) -> Path:
    """Train the centralized baseline of ``cfg``; returns the run directory."""
    from dataclasses import replace

    task = task or default_task(cfg)
    # Size the run before set-up: `rounds` of the central run counts central rounds.
    schedule = _schedule_without_data(cfg)
    cfg = replace(cfg, rounds=schedule["rounds"])
    task.cfg = cfg
    fed = setup(cfg, task)
    trainer = CentralTrainer(fed, schedule)
    if fed.resumed_from is not None:
        _restore_optimizer(trainer, fed)
    logger = open_run(fed, "central",
                      f"{task.describe(fed)} (the union of {cfg.num_clients} clients' data), global "
                      f"batch {trainer.batch} ({trainer.batch // fed.world_size} per rank), "
                      f"{schedule['total_steps']} steps in {cfg.rounds} rounds of "
                      f"{schedule['steps_per_round']}, {fed.params.numel:,} parameters")
    return drive(fed, logger, lambda global_round: run_central_round(fed, trainer, schedule,
                                                                     global_round, logger))


def _schedule_without_data(cfg: Config) -> dict:
    """plan() needs client sizes only with local_epochs; then the partition is built here."""
    if cfg.local_epochs is None:
        return plan(cfg, [0] * cfg.num_clients)
    from fedrun.data import build_datasets, partition_indices

    train, _ = build_datasets(cfg.data, cfg.seed)
    parts = partition_indices(train.labels, len(train), cfg.num_clients, cfg.partition, cfg.seed)
    return plan(cfg, [len(p) for p in parts])


def _restore_optimizer(trainer: CentralTrainer, fed: Federation) -> None:
    from fedrun.checkpoint import load_checkpoint

    group = load_checkpoint(fed.resumed_from).groups.get("optimizer")
    if group is None:
        raise CheckpointError(f"checkpoint '{fed.resumed_from}' has no optimizer state: it was not "
                              "written by `fedrun central`")
    trainer.load_optimizer(group)


def run_central_round(fed: Federation, trainer: CentralTrainer, schedule: dict, global_round: int,
                      logger: RunLogger) -> dict:
    """``steps_per_round`` data-parallel steps, then EMA and the shared Step 5 outputs."""
    started = time.perf_counter()
    first = global_round * schedule["steps_per_round"]
    last = min(first + schedule["steps_per_round"], schedule["total_steps"])
    loss_sum = torch.zeros((), device=fed.device)
    for step in range(first, last):
        loss_sum += trainer.train_step(step)
    compute_s = time.perf_counter() - started
    # The round's mean loss over the global batches: one small reduction per round.
    stats = torch.stack([loss_sum, torch.tensor(float(trainer.batch // fed.world_size * (last - first)))])
    dist.all_reduce_sum(stats)
    fed.global_weights.copy_(fed.params.flat)
    fed.ema.update(fed.global_weights)
    round_samples = (last - first) * trainer.batch
    round_bytes = (last - first) * trainer.step_bytes
    fed.samples_seen += round_samples
    fed.bytes_total += round_bytes
    done = global_round + 1
    record = {
        "round": done, "steps": last, "samples": fed.samples_seen, "round_samples": round_samples,
        "train_loss": float(stats[0] / stats[1]), "world_size": fed.world_size,
        "bytes_per_step": trainer.step_bytes, "bytes_round": round_bytes,
        "bytes_total": fed.bytes_total, "local_compute_s": compute_s,
    }
    if fed.rank != 0:
        return record
    return write_outputs(fed, done, record, logger, started, extra_groups=trainer.optimizer_groups)
