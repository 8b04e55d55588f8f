"""The federated round loop (FedAvg over torchrun ranks), written as numbered steps.

    Step 1  cohort: the sampled clients of this round (same on every rank), minus those that
            drop out (faults.dropout), dealt to ranks
    Step 2  local training: each rank trains its clients from the global weights and adds
            n_c * (w_c - w) to its round buffer (a non-finite update is rejected, not added)
    Step 3  ONE all_reduce(SUM) of the flat buffer [sum n_c delta_c, sum n_c, stats]; a rank
            that hangs makes it fail after dist_timeout_s with an error naming the round
    Step 4  server step on the averaged update (every rank, identically), EMA update
    Step 5  rank 0: log, sample grid, evaluation (FID/KID every eval.every rounds), checkpoint
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from fedrun import dist
from fedrun.aggregate import RoundBuffer, client_weight, weighted_loss
from fedrun.checkpoint import Checkpoint, load_checkpoint, prepare_run_dir, save_checkpoint
from fedrun.client import batch_indices, client_generator, num_local_steps, train_client
from fedrun.cohort import assign_to_ranks, dropped_clients, sample_cohort
from fedrun.config import Config, diff_keys, digest, digest_view, to_dict, to_yaml
from fedrun.errors import CheckpointError, DistributedError, FedrunError
from fedrun.logging import RunLogger, jsonable, truncate_metrics

BYTES_PER_FLOAT = 4


@dataclass
class Federation:
    """Everything the round loop works on; identical on every rank except ``rank``."""

    cfg: Config
    task: object  # e.g. pretrain.PretrainTask: builds data/model, loss, samples, export
    device: torch.device
    rank: int
    world_size: int
    dataset: object
    client_indices: List[np.ndarray]
    model: torch.nn.Module  # the training replica
    params: object  # models.FlatParameters: the replica's trainable parameters, one vector
    loss: object  # loss(batch_indices, generator) -> scalar tensor
    noise_scheduler: object
    global_weights: torch.Tensor
    server: object
    ema: object
    start_round: int = 0
    resumed_record: Optional[dict] = None  # metrics record of the checkpointed round
    samples_seen: int = 0
    bytes_total: int = 0
    round_buffer: Optional[RoundBuffer] = None  # reused every round (no per-round allocation)
    resumed_from: Optional[Path] = None  # the checkpoint folder this run continued from


# ---------------------------------------------------------------- set-up

def _prepare_on_rank0(cfg: Config) -> tuple:
    """Rank 0 decides what happens to the run directory; the outcome (or the error) is shared."""
    try:
        resume_from = prepare_run_dir(Path(cfg.output_dir), cfg.resume, cfg.overwrite)
        return ("ok", str(resume_from) if resume_from else None)
    except FedrunError as exc:
        return ("error", f"{type(exc).__name__}:{exc}")


def default_task(cfg: Config):
    from fedrun.pretrain import PretrainTask

    return PretrainTask(cfg)


def setup(cfg: Config, task=None) -> Federation:
    """Process group, run directory, data, partition, model, server: ready for round 0 (or resume).
    ``task`` defaults to DDPM pre-training."""
    task = task or default_task(cfg)
    from fedrun.data import partition_indices
    from fedrun.models import FlatParameters
    from fedrun.server import EMA, build_server

    device = dist.init(cfg.device, cfg.dist_timeout_s, cfg.threads)
    rank, world = dist.rank(), dist.world_size()
    decision = _prepare_on_rank0(cfg) if rank == 0 else None
    status, payload = dist.broadcast_object(decision)
    if status == "error":
        kind, message = payload.split(":", 1)
        raise CheckpointError(message) if kind == "CheckpointError" else FedrunError(message)

    built = task.build(device)
    client_indices = partition_indices(built.dataset.labels, len(built.dataset), cfg.num_clients,
                                       cfg.partition, cfg.seed)
    params = FlatParameters(built.model)
    fed = Federation(
        cfg=cfg, task=task, device=device, rank=rank, world_size=world, dataset=built.dataset,
        client_indices=client_indices, model=built.model, params=params, loss=None,
        noise_scheduler=built.noise_scheduler, global_weights=params.flat.detach().clone(),
        server=build_server(cfg.server), ema=None,
    )
    fed.loss = task.make_loss(fed)
    fed.ema = EMA(fed.global_weights, cfg.ema)
    if payload is not None:
        fed.resumed_from = Path(payload)
        restore(fed, load_checkpoint(fed.resumed_from))
    return fed


def restore(fed: Federation, ckpt: Checkpoint) -> None:
    """Load global weights, EMA and server state from a checkpoint; refuse a different config."""
    saved_view = ckpt.state.get("config", {})
    if ckpt.state.get("config_digest") != digest(fed.cfg):
        changed = diff_keys(saved_view, digest_view(fed.cfg))
        raise CheckpointError(
            f"checkpoint '{ckpt.path}' was written with a different config; differing keys: "
            + "; ".join(changed or ["(unknown: the checkpoint has no config view)"]))
    if ckpt.round > fed.cfg.rounds:
        raise CheckpointError(f"checkpoint '{ckpt.path}' is at round {ckpt.round}, beyond "
                              f"rounds={fed.cfg.rounds}; raise 'rounds' to continue it")
    try:
        fed.global_weights.copy_(fed.params.vector_from(ckpt.groups["model"]))
        fed.ema.shadow.copy_(fed.params.vector_from(ckpt.groups["ema"]))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint '{ckpt.path}' does not fit the model: {exc}") from None
    fed.server.load_state_dict({k: v.to(fed.device) for k, v in ckpt.groups.get("server", {}).items()})
    fed.ema.updates = int(ckpt.state["ema_updates"])
    fed.start_round = ckpt.round
    fed.resumed_record = ckpt.state.get("metrics_record")
    fed.samples_seen = int(ckpt.state["samples_seen"])
    fed.bytes_total = int(ckpt.state["bytes_total"])


# ---------------------------------------------------------------- one round

def select_clients(fed: Federation, global_round: int) -> tuple[list, list, list]:
    """Step 1: the cohort (same on every rank), the clients of it that drop out of this round,
    and the surviving clients this rank trains."""
    cfg = fed.cfg
    cohort = sample_cohort(cfg.num_clients, cfg.cohort_size, cfg.seed, global_round)
    dropped = dropped_clients(cohort, cfg.faults.dropout, cfg.faults.dropout_schedule, cfg.seed,
                              global_round)
    survivors = [c for c in cohort if c not in dropped]
    costs = [_client_steps(fed, c) for c in survivors]
    return cohort, dropped, assign_to_ranks(survivors, fed.world_size, costs)[fed.rank]


def _client_steps(fed: Federation, client: int) -> int:
    cfg = fed.cfg
    return num_local_steps(len(fed.client_indices[client]), cfg.optim.batch_size,
                           cfg.local_steps, cfg.local_epochs)


def train_local(fed: Federation, cohort: list, mine: list, global_round: int) -> RoundBuffer:
    """Step 2: train this rank's clients, each from the global weights, into the round buffer."""
    cfg = fed.cfg
    buffer = RoundBuffer(fed.params.numel, cohort, fed.world_size, fed.device, reuse=fed.round_buffer)
    fed.round_buffer = buffer
    started = time.perf_counter()
    for client in mine:
        fed.params.load_(fed.global_weights)
        generator = client_generator(cfg.seed, client, global_round)
        indices = fed.client_indices[client]
        batches = batch_indices(indices, _client_steps(fed, client), cfg.optim.batch_size, generator)
        result = train_client(fed.model, fed.params.params, fed.loss, batches, generator,
                              cfg.optim, fed.device)
        if [global_round + 1, client] in cfg.faults.nonfinite_schedule:  # simulated corruption
            fed.params.flat[0] = float("nan")
        weight = client_weight(len(indices), cfg.server.weighting)
        accepted = buffer.add_client(client, fed.params.flat, fed.global_weights, weight,
                                     result.mean_loss, result.samples)
        if accepted and hasattr(fed.task, "observe_client"):  # task hook (LoRA: B_c A_c)
            fed.task.observe_client(fed, client, weight, global_round)
    if fed.device.type == "cuda":
        torch.cuda.synchronize(fed.device)
    buffer.set_compute_time(fed.rank, time.perf_counter() - started)
    return buffer


def reduce_round(buffer: RoundBuffer, global_round: int):
    """Step 3: ONE all-reduce of the flat buffer, decoded; a failure names the round."""
    try:
        dist.all_reduce_sum(buffer.buffer)
    except DistributedError as exc:
        raise DistributedError(f"round {global_round + 1}: {exc}") from exc
    return buffer.decode()


def server_update(fed: Federation, result) -> bool:
    """Step 4: apply the averaged update (a round where no weight arrived keeps the model)."""
    if result.total_weight <= 0:
        return False
    fed.server.step(fed.global_weights, result.update_sum, result.total_weight)
    fed.ema.update(fed.global_weights)
    return True


def account(fed: Federation, result) -> dict:
    """Samples and bytes of the round (every rank keeps the totals: they are checkpointed)."""
    update_bytes = fed.params.numel * BYTES_PER_FLOAT
    trained = [c for c, w in result.client_weight.items() if w > 0]
    round_samples = sum(result.client_samples.values())
    sent = len(trained) + len(result.rejected)  # a rejected update was sent, then refused
    round_bytes = 2 * update_bytes * sent  # each client receives w and sends its update
    fed.samples_seen += round_samples
    fed.bytes_total += round_bytes
    return {
        "samples": fed.samples_seen,
        "round_samples": round_samples,
        "train_loss": weighted_loss(result),
        "clients": trained,
        "client_loss": {c: result.client_loss[c] for c in trained},
        "client_samples": {c: result.client_samples[c] for c in trained},
        "rejected_nonfinite": result.rejected,
        "bytes_sent_per_client": update_bytes,
        "bytes_received_per_client": update_bytes,
        "bytes_round": round_bytes,
        "bytes_total": fed.bytes_total,
        "local_compute_s": max(result.rank_compute_s),
        "local_compute_s_per_rank": result.rank_compute_s,
    }


# ---------------------------------------------------------------- outputs

def _is_due(every: int, done_rounds: int, total: int) -> bool:
    return done_rounds == total or (every > 0 and done_rounds % every == 0)


def write_checkpoint(fed: Federation, done_rounds: int, record: Optional[dict] = None,
                     extra_groups: Optional[dict] = None) -> Path:
    """Global weights, EMA and server state (plus ``extra_groups``, e.g. an optimizer's state)
    and the round's metrics ``record``."""
    state = {
        "config_digest": digest(fed.cfg),
        "config": digest_view(fed.cfg),
        "ema_updates": fed.ema.updates,
        "samples_seen": fed.samples_seen,
        "bytes_total": fed.bytes_total,
        "world_size": fed.world_size,
        # All randomness is derived from (seed, round) and (seed, client, round): there is no
        # hidden generator state to save, which is why a resumed run equals an uninterrupted one.
        "rng": {"scheme": "derived per (seed, client, round)", "seed": fed.cfg.seed},
        # The round's metrics (its timings are still running): restored on resume if the process
        # dies between this checkpoint and the metrics.jsonl line, so the log stays complete.
        "metrics_record": jsonable(record) if record is not None else None,
    }
    groups = {
        "model": fed.params.state_dict(fed.global_weights),
        "ema": fed.params.state_dict(fed.ema.shadow),
        "server": fed.server.state_dict(),
        **(extra_groups or {}),
    }
    return save_checkpoint(Path(fed.cfg.output_dir), done_rounds, groups, state,
                           fed.cfg.checkpoint.keep_last)


def export_final(fed: Federation) -> Path:
    """final/: the task's export (a stock diffusers folder), written under a temporary name."""
    import shutil

    out = Path(fed.cfg.output_dir) / "final"
    tmp = out.with_name(".final.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    fed.task.export(fed, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


# ---------------------------------------------------------------- the loop

def run(cfg: Config, task=None) -> Path:
    """Train ``cfg.rounds`` FedAvg rounds of ``task`` (default: DDPM pre-training); returns the
    run directory."""
    task = task or default_task(cfg)
    fed = setup(cfg, task)
    logger = open_run(fed, task.name, f"{task.describe(fed)}, {cfg.num_clients} clients "
                                      f"({cfg.cohort_size} per round), "
                                      f"{fed.params.numel:,} federated parameters")
    if fed.rank == 0:
        _write_partition(fed, Path(cfg.output_dir))
    return drive(fed, logger, lambda global_round: run_round(fed, global_round, logger))


def open_run(fed: Federation, job_type: str, description: str) -> RunLogger:
    """Rank 0 writes config.yaml and trims metrics.jsonl to the resumed round; the logger (a
    no-op on other ranks) opens and says what runs."""
    from fedrun.checkpoint import atomic_write_text

    cfg, run_dir, main = fed.cfg, Path(fed.cfg.output_dir), fed.rank == 0
    if main:
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        truncate_metrics(run_dir, fed.start_round, fed.resumed_record)
    logger = RunLogger(run_dir, cfg.logging, to_dict(cfg), cfg.rounds, fed.start_round, enabled=main,
                       job_type=job_type)
    logger.write(f"fedrun {job_type}: {dist.describe(fed.device)}, {description}"
                 + (f", resuming after round {fed.start_round}" if fed.start_round else ""))
    return logger


def drive(fed: Federation, logger: RunLogger, one_round) -> Path:
    """Run the remaining rounds (``one_round(global_round)`` returns the round's record), then
    rank 0 exports final/ and writes the run summary. Shared with the centralized baseline."""
    try:
        record = {}
        for global_round in range(fed.start_round, fed.cfg.rounds):
            record = one_round(global_round)
        if fed.rank == 0:
            export_final(fed)
            task_summary = getattr(fed.task, "summary", None)
            logger.summary({"final_train_loss": record.get("train_loss"),
                            "samples": fed.samples_seen, "bytes_total": fed.bytes_total,
                            **(task_summary(fed) if task_summary else {})})
    finally:
        logger.close()
    dist.barrier()
    return Path(fed.cfg.output_dir)


def run_round(fed: Federation, global_round: int, logger: RunLogger) -> dict:
    """One round; returns its metrics record (complete on rank 0)."""
    started = time.perf_counter()
    # Step 1: cohort, minus the clients that dropped out
    cohort, dropped, mine = select_clients(fed, global_round)
    # Step 2: local training
    buffer = train_local(fed, cohort, mine, global_round)
    # Step 3: one all-reduce of the flat buffer
    reduce_started = time.perf_counter()
    result = reduce_round(buffer, global_round)
    aggregation_s = time.perf_counter() - reduce_started
    # optional task metrics of the reduced round, before the server step (may be collective)
    task_metrics = fed.task.round_metrics(fed, global_round, result) \
        if hasattr(fed.task, "round_metrics") else {}
    # Step 4: server step
    server_started = time.perf_counter()
    updated = server_update(fed, result)
    done = global_round + 1
    record = {"round": done, **account(fed, result), **task_metrics, "dropped": dropped,
              "model_updated": updated, "aggregation_s": aggregation_s,
              "server_s": time.perf_counter() - server_started}
    # Step 5: log / sample / evaluate / checkpoint (rank 0)
    if fed.rank != 0:
        return record
    if result.rejected:
        logger.write(f"round {done}: rejected the non-finite update of client(s) {result.rejected}")
    if not updated:
        logger.write(f"round {done}: no client update arrived; the global model is unchanged")
    return write_outputs(fed, done, record, logger, started)


def write_outputs(fed: Federation, done: int, record: dict, logger: RunLogger, started: float,
                  extra_groups=None) -> dict:
    """Step 5 on rank 0 (shared with the centralized baseline): sample grid, evaluation,
    checkpoint, then the round's record to metrics.jsonl / W&B. ``extra_groups()``, when given,
    returns more tensor groups for the checkpoint (called only when one is due)."""
    cfg = fed.cfg
    output_started = time.perf_counter()
    if _is_due(cfg.sample.every, done, cfg.rounds):
        fed.task.write_samples(fed, done, logger)
    record["sample_s"] = time.perf_counter() - output_started
    if cfg.eval.every > 0 and _is_due(cfg.eval.every, done, cfg.rounds) and hasattr(fed.task, "evaluate"):
        eval_started = time.perf_counter()
        record.update(fed.task.evaluate(fed, done, logger))
        record["eval_s"] = time.perf_counter() - eval_started
    checkpoint_started = time.perf_counter()
    if _is_due(cfg.checkpoint.every, done, cfg.rounds):
        write_checkpoint(fed, done, record, extra_groups() if extra_groups else None)
    record["checkpoint_s"] = time.perf_counter() - checkpoint_started
    record["round_time_s"] = time.perf_counter() - started
    logger.log(record)
    logger.progress(done, loss=record["train_loss"], round_s=record["round_time_s"],
                    **({"fid": record["fid"]} if "fid" in record else {}))
    return record


def _write_partition(fed: Federation, run_dir: Path) -> None:
    import json

    from fedrun.checkpoint import atomic_write_text
    from fedrun.data import partition_summary

    summary = partition_summary(fed.client_indices, fed.dataset.labels)
    atomic_write_text(run_dir / "partition.json", json.dumps(summary))
