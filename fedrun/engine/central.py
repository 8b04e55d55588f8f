"""The centralized baseline: the same model, optimizer, learning rate and batch as a federated
client, trained data-parallel on the union of the clients' data, for a budget in samples matched
to a federated run. It runs through ``accelerate.Accelerator`` -- DDP, mixed precision
(``precision``), gradient accumulation over micro-batches -- the way diffusers' own training
scripts do, so the baseline is what a diffusers user would run.

    python -m fedrun central --config configs/digits_fedavg.yaml            # 1 process
    torchrun --nproc_per_node=2 -m fedrun central --config configs/digits_fedavg.yaml

The task (``fedrun.tasks``) supplies the data, the model and the loss, so the same command is the
centralized baseline of pre-training and, with a fine-tuning config, of federated LoRA (all the
subject images in one place, the same samples seen, a stock-loadable ``final/``).

Step s draws its global batch of indices from a generator seeded by (seed, s) on every rank, and
rank k trains on the k-th slice of it; DDP's average of the slices' gradients is the gradient of
the global batch. The randomness of the loss (noise, timesteps) comes from a generator per
micro-batch, seeded by (seed, s, the micro-batch's offset in the global batch). With
``central.micro_batch`` = batch / W_max every rank count up to W_max (powers of two) computes the
same micro-batches with the same noise, and the results are bit-identical (halving is exact; a
sum of two terms does not depend on order). Without it, a rank's whole slice is one micro-batch:
other world sizes then draw other noise, and runs agree statistically, not bit for bit.

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
from typing import Optional

import numpy as np
import torch

from fedrun.config import Config
from fedrun.engine import dist
from fedrun.engine.checkpoint import load_checkpoint
from fedrun.engine.metrics import RunLogger
from fedrun.engine.run import (Run, device_memory, drive, open_run, restore_run, start_logging,
                               with_rounds, write_outputs)
from fedrun.errors import CheckpointError, ConfigError
from fedrun.fl.aggregation.buffer import BYTES_PER_FLOAT
from fedrun.fl.local import (OPTIM_PREFIX, batch_indices, build_optimizer, load_optimizer_state,
                             num_local_steps, optimizer_state)
from fedrun.rng import derived_generator
from fedrun.tasks.base import Task, build_task

_STREAM = 0xCE47  # keeps the central batch stream apart from the clients' (seed, client, round)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of global step ``step`` (same on every rank): its batch indices."""
    return derived_generator(seed, _STREAM, step)


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


def build_accelerator(run: Run, accumulation_steps: int):
    """An ``accelerate.Accelerator`` on the process group fedrun already joined (accelerate uses
    an initialised group as it is)."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # accelerate resets a CPU rank's threads unless OMP_NUM_THREADS says how many: keep fedrun's
    # share (dist.init), since oversubscribed CPU ranks crawl.
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if dist.shares_gpus():
        # accelerate's DDP would pin device_ids=[LOCAL_RANK], which does not exist when ranks
        # share GPUs (rank k is on cuda:(k mod count)); without device_ids DDP uses the module's.
        os.environ["ACCELERATE_BYPASS_DEVICE_MAP"] = "true"
    # device_placement=False: the replica is already on its device, and its parameters are views
    # of the flat federated vector; accelerate's CPU device is 'cpu:0', and .to('cpu:0') would
    # copy them out of it.
    return Accelerator(cpu=run.device.type == "cpu", device_placement=False,
                       mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[run.cfg.precision],
                       gradient_accumulation_steps=accumulation_steps,
                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def release_accelerator() -> None:
    """Forget accelerate's process-wide state, so that a later run in this process (tests,
    ``fedrun compare`` in one process) starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class CentralTrainer:
    """One replica prepared by accelerate (DDP over the ranks) and one optimizer (optim.name)
    that lives for the whole run."""

    def __init__(self, run: Run, schedule: dict):
        cfg = run.cfg
        self.run = run
        self.batch = schedule["batch"]
        if self.batch % run.world_size:
            raise ConfigError(f"config key 'central.batch_size': the global batch {self.batch} must "
                              f"be divisible by the number of ranks ({run.world_size})")
        self.slice = slice(run.rank * self.batch // run.world_size,
                           (run.rank + 1) * self.batch // run.world_size)
        slice_size = self.batch // run.world_size
        self.micro = min(cfg.central.micro_batch or slice_size, slice_size)
        if slice_size % self.micro:
            raise ConfigError(f"config key 'central.micro_batch': {self.micro} does not divide a "
                              f"rank's slice of the global batch ({slice_size})")
        self.union = np.sort(np.concatenate(run.client_indices))  # the clients' data, pooled
        run.params.load_(run.global_weights)
        self.local_optimizer = build_optimizer(run.params.params, cfg.optim)  # optim.name
        self.accelerator = build_accelerator(run, slice_size // self.micro)
        self.model, self.optimizer = self.accelerator.prepare(run.model, self.local_optimizer)
        self.step_bytes = 2 * (run.world_size - 1) * BYTES_PER_FLOAT * run.params.numel

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step on this rank's slice of global batch ``step``; returns the slice's
        summed loss (for the round's mean)."""
        run, cfg = self.run, self.run.cfg
        indices = batch_indices(self.union, 1, self.batch, step_generator(cfg.seed, step))[0]
        accelerator = self.accelerator
        self.model.train()
        loss_sum = torch.zeros((), device=run.device)
        for start in range(self.slice.start, self.slice.stop, self.micro):
            generator = derived_generator(cfg.seed, _STREAM, step, start)
            # accelerate divides the loss by the number of micro-batches (the slice's mean) and
            # skips DDP's all-reduce, the clipping and the optimizer step until the last one.
            with accelerator.accumulate(self.model):
                loss = run.task.loss(self.model, indices[start: start + self.micro], generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.grad_clip is not None:
                    accelerator.clip_grad_norm_(run.params.params, cfg.optim.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float() * self.micro
        return loss_sum

    # The optimizer state is part of the resumable state (it persists across steps here), in
    # the flat form the client state store uses for stateful client optimizers.
    def optimizer_groups(self) -> dict:
        state = optimizer_state(self.local_optimizer, self.run.params.params)
        return {"optimizer": {k[len(OPTIM_PREFIX):]: v for k, v in state.items()}} if state else {}

    def load_optimizer(self, group: dict) -> None:
        load_optimizer_state(self.local_optimizer, self.run.params.params,
                             {OPTIM_PREFIX + k: v for k, v in group.items()})


def run_central(cfg: Config, task: Optional[Task] = None) -> Path:
    """Train the centralized baseline of ``cfg`` (default task: the config's); returns the run
    directory."""
    task = task or build_task(cfg)
    if cfg.privacy.enabled:
        raise ConfigError("config key 'privacy.enabled': the centralized baseline sees every "
                          "client's data and has no client-level DP; set privacy.enabled=false")
    with dist.session(cfg.device, cfg.dist_timeout_s, cfg.threads), _accelerate_state():
        run = open_run(cfg, task)
        # `rounds` of the central run counts central rounds, sized from the partition.
        schedule = plan(cfg, [len(p) for p in run.client_indices])
        run = with_rounds(run, schedule["rounds"])
        cfg = run.cfg
        trainer = CentralTrainer(run, schedule)
        if run.resume_from is not None:
            ckpt = load_checkpoint(run.resume_from)
            restore_run(run, ckpt)
            if "optimizer" not in ckpt.groups:
                raise CheckpointError(f"checkpoint '{run.resume_from}' has no optimizer state: it "
                                      "was not written by `fedrun central`")
            trainer.load_optimizer(ckpt.groups["optimizer"])
            run.params.load_(run.global_weights)
        logger = start_logging(run, "central",
                          f"task {task.name}: {task.describe(run)} (the union of {cfg.num_clients} clients' data), "
                          f"global batch {trainer.batch} ({trainer.batch // run.world_size} per "
                          f"rank), {schedule['total_steps']} steps in {cfg.rounds} rounds of "
                          f"{schedule['steps_per_round']}, {run.params.numel:,} parameters")
        return drive(run, logger, lambda global_round: run_central_round(
            run, trainer, schedule, global_round, logger))


@contextlib.contextmanager
def _accelerate_state():
    try:
        yield
    finally:
        release_accelerator()


def run_central_round(run: Run, trainer: CentralTrainer, schedule: dict, global_round: int,
                      logger: RunLogger) -> dict:
    """``steps_per_round`` data-parallel steps, then EMA and the shared outputs."""
    started = time.perf_counter()
    first = global_round * schedule["steps_per_round"]
    last = min(first + schedule["steps_per_round"], schedule["total_steps"])
    loss_sum = torch.zeros((), device=run.device)
    for step in range(first, last):
        loss_sum += trainer.train_step(step)
    compute_s = time.perf_counter() - started
    # The round's mean loss over the global batches: one small reduction per round.
    stats = torch.stack([loss_sum, torch.tensor(float(trainer.batch // run.world_size * (last - first)))])
    dist.all_reduce_sum(stats)
    run.global_weights.copy_(run.params.flat)
    run.ema.update(run.global_weights)
    round_samples = (last - first) * trainer.batch
    round_bytes = (last - first) * trainer.step_bytes
    progress = run.progress
    progress.samples_seen += round_samples
    progress.bytes_total += round_bytes
    done = global_round + 1
    record = {
        "round": done, "steps": last, "samples": progress.samples_seen, "round_samples": round_samples,
        "train_loss": float(stats[0] / stats[1]), "world_size": run.world_size,
        "bytes_per_step": trainer.step_bytes, "bytes_round": round_bytes,
        "bytes_total": progress.bytes_total, "local_compute_s": compute_s, **device_memory(run.device),
    }
    if run.rank != 0:
        return record
    return write_outputs(run, done, record, logger, started,
                         checkpoint_groups=trainer.optimizer_groups)
