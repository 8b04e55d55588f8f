"""The run lifecycle shared by the federated round loop and the centralized baseline: open a run
(process group, run directory, data, partition, model, EMA), restore it, drive its rounds, write
a round's outputs (samples, evaluation, checkpoint, metrics) and export ``final/``.

It knows nothing of FedAvg: ``fedrun.engine.simulator`` and ``fedrun.engine.central`` each keep
their own state (seams; DDP and a persistent optimizer) beside the ``Run`` and pass their own
round function to ``drive``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from fedrun.config import Config, digest, digest_view, resume_differences, to_dict, to_yaml
from fedrun.engine import dist
from fedrun.engine.checkpoint import Checkpoint, prepare_run_dir, save_checkpoint
from fedrun.engine.ema import EMA
from fedrun.engine.flat import FlatParameters
from fedrun.engine.metrics import RunLogger, jsonable, truncate_metrics
from fedrun.errors import CheckpointError, FedrunError
from fedrun.tasks.base import Task, TrainingData

if TYPE_CHECKING:
    from diffusers import SchedulerMixin


@dataclass
class Progress:
    """What a run counts as it goes (checkpointed, restored on resume)."""

    start_round: int = 0  # the first round still to run
    samples_seen: int = 0
    bytes_total: int = 0
    bytes_up_total: int = 0  # federated runs: client -> server
    bytes_down_total: int = 0  # federated runs: server -> client
    resumed_record: Optional[dict] = None  # metrics record of the checkpointed round


@dataclass(frozen=True)
class Run:
    """What a run works on, built once by ``open_run``; the same on every rank but ``rank``.
    The tensors ``global_weights`` and ``ema.shadow`` change in place, never by rebinding; the
    counters are in ``progress``."""

    cfg: Config
    task: Task
    device: torch.device
    rank: int
    world_size: int
    dataset: TrainingData
    client_indices: Sequence[np.ndarray]
    model: torch.nn.Module  # the training replica
    params: FlatParameters  # the replica's trainable parameters, one vector
    noise_scheduler: "SchedulerMixin"
    global_weights: torch.Tensor
    ema: EMA
    resume_from: Optional[Path] = None  # the checkpoint folder this run continues from
    progress: Progress = field(default_factory=Progress)


def device_memory(device: torch.device) -> dict:
    """Peak GPU memory of this rank so far (for the round's record; nothing on CPU)."""
    if device.type != "cuda":
        return {}
    return {"gpu_peak_bytes": torch.cuda.max_memory_allocated(device)}


def is_due(every: int, done_rounds: int, total: int) -> bool:
    """The cadence of every ``*.every`` key: every ``every`` rounds (0 = never) and the last."""
    return done_rounds == total or (every > 0 and done_rounds % every == 0)


def evaluation_due(cfg: Config, done_rounds: int) -> bool:
    """``eval.every`` rounds and the last (when every > 0), and each round of ``eval.at``."""
    return (cfg.eval.every > 0 and is_due(cfg.eval.every, done_rounds, cfg.rounds)) or done_rounds in cfg.eval.at


# ---------------------------------------------------------------- open / restore

def _prepare_on_rank0(cfg: Config) -> tuple:
    """Rank 0 decides what happens to the run directory; the outcome (or the error) is shared."""
    try:
        resume_from = prepare_run_dir(Path(cfg.output_dir), cfg.resume, cfg.overwrite)
        from fedrun.engine.client_state import ClientStateStore

        store = ClientStateStore(Path(cfg.output_dir))
        if resume_from is not None and store.root.is_dir():  # a stateful client algorithm's run
            from fedrun.engine.checkpoint import load_checkpoint

            # Client states written after the checkpoint belong to rounds that will be redone.
            store.truncate(load_checkpoint(resume_from).round)
        return ("ok", str(resume_from) if resume_from else None)
    except FedrunError as exc:
        return ("error", f"{type(exc).__name__}:{exc}")


def open_run(cfg: Config, task: Task) -> Run:
    """Process group (already joined by ``dist.session``), run directory, data, partition,
    model, EMA: a ``Run`` ready for round 0 (``resume_from`` says whether to restore)."""
    from fedrun.data import partition_indices
    from fedrun.fl.local import check_precision

    device = dist.init(cfg.device, cfg.dist_timeout_s, cfg.threads)
    check_precision(cfg.precision, device)
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
    global_weights = params.flat.detach().clone()
    run = Run(cfg=cfg, task=task, device=device, rank=rank, world_size=world,
              dataset=built.dataset, client_indices=client_indices, model=built.model,
              params=params, noise_scheduler=built.noise_scheduler, global_weights=global_weights,
              ema=EMA(global_weights, cfg.ema), resume_from=Path(payload) if payload else None)
    task.prepare(run)
    return run


def restore_run(run: Run, ckpt: Checkpoint) -> None:
    """Global weights, EMA and counters from a checkpoint; refuse a different config."""
    saved_view = ckpt.state.get("config")
    if ckpt.state.get("config_digest") != digest(run.cfg):
        changed, added = resume_differences(saved_view, run.cfg) if saved_view else ([], [])
        if changed or not saved_view:
            raise CheckpointError(
                f"checkpoint '{ckpt.path}' was written with a different config; differing keys: "
                + "; ".join(changed or ["(unknown: the checkpoint has no config view)"]))
        if run.rank == 0:  # only options added since, at their defaults: the same trajectory
            print(f"resuming from '{ckpt.path}', written before the options {', '.join(added)} "
                  "existed; they are at their defaults (off)", flush=True)
    if ckpt.round > run.cfg.rounds:
        raise CheckpointError(f"checkpoint '{ckpt.path}' is at round {ckpt.round}, beyond "
                              f"rounds={run.cfg.rounds}; raise 'rounds' to continue it")
    try:
        run.global_weights.copy_(run.params.vector_from(ckpt.groups["model"]))
        run.ema.shadow.copy_(run.params.vector_from(ckpt.groups["ema"]))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint '{ckpt.path}' does not fit the model: {exc}") from None
    run.ema.updates = int(ckpt.state["ema_updates"])
    run.progress.start_round = ckpt.round
    run.progress.resumed_record = ckpt.state.get("metrics_record")
    run.progress.samples_seen = int(ckpt.state["samples_seen"])
    run.progress.bytes_total = int(ckpt.state["bytes_total"])
    # checkpoints written before the directions were counted apart: half each way (fp32 FedAvg)
    run.progress.bytes_up_total = int(ckpt.state.get("bytes_up_total", run.progress.bytes_total // 2))
    run.progress.bytes_down_total = int(ckpt.state.get("bytes_down_total",
                                                       run.progress.bytes_total - run.progress.bytes_up_total))


#: A run that stopped itself because it cannot learn (every client update rejected round after
#: round) leaves RUN_DIR/stopped.json: {"reason": "cannot learn", "round", "error"}. It is a
#: result, not a crash: the experiment runner does not start such a run again.
STOPPED_FILE = "stopped.json"


def start_logging(run: Run, job_type: str, description: str) -> RunLogger:
    """Rank 0 writes config.yaml (and partition.json) and trims metrics.jsonl to the resumed
    round; the logger (a no-op on other ranks) opens and says what runs."""
    from fedrun.engine.checkpoint import atomic_write_text

    cfg, run_dir, main = run.cfg, Path(run.cfg.output_dir), run.rank == 0
    start = run.progress.start_round
    if main:
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)  # a resumed run is not stopped (yet)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        truncate_metrics(run_dir, start, run.progress.resumed_record)
        _write_partition(run, run_dir)
    logger = RunLogger(run_dir, cfg.logging, to_dict(cfg), cfg.rounds, start, enabled=main,
                       job_type=job_type)
    logger.write(f"fedrun {job_type}: {dist.describe(run.device)}, {description}"
                 + (f", resuming after round {start}" if start else ""))
    return logger


def _write_partition(run: Run, run_dir: Path) -> None:
    import json

    from fedrun.data import partition_summary
    from fedrun.engine.checkpoint import atomic_write_text

    summary = partition_summary(run.client_indices, run.dataset.labels)
    atomic_write_text(run_dir / "partition.json", json.dumps(summary))


def with_rounds(run: Run, rounds: int) -> Run:
    """The same run with ``cfg.rounds`` changed (the centralized baseline sizes its own)."""
    cfg = dataclasses.replace(run.cfg, rounds=rounds)
    run.task.cfg = cfg
    return dataclasses.replace(run, cfg=cfg)


# ---------------------------------------------------------------- rounds and outputs

def drive(run: Run, logger: RunLogger, one_round: Callable[[int], dict],
          finalize: Optional[Callable[[], dict]] = None) -> Path:
    """Run the remaining rounds (``one_round(global_round)`` returns the round's record), then
    rank 0 exports final/, runs ``finalize()`` (files of its own next to the export; returns
    keys for the summary) and writes the run summary."""
    try:
        record: dict = {}
        for global_round in range(run.progress.start_round, run.cfg.rounds):
            record = one_round(global_round)
        if run.rank == 0:
            export_final(run)
            extra = finalize() if finalize is not None else {}
            logger.summary({"final_train_loss": record.get("train_loss"),
                            "samples": run.progress.samples_seen,
                            "bytes_total": run.progress.bytes_total,
                            **run.task.summary(run), **extra})
    finally:
        logger.close()
    dist.barrier()
    return Path(run.cfg.output_dir)


def write_outputs(run: Run, done: int, record: dict, logger: RunLogger, started: float,
                  checkpoint_groups: Callable[[], Dict[str, dict]],
                  checkpoint_state: Optional[dict] = None,
                  after_checkpoint: Optional[Callable[[], None]] = None) -> dict:
    """A round's outputs on rank 0: sample grid, evaluation, checkpoint (``checkpoint_groups()``
    gives the run-specific tensor groups, called only when one is due; ``after_checkpoint``
    runs after it is written), then the round's record to metrics.jsonl / W&B."""
    cfg = run.cfg
    output_started = time.perf_counter()
    if is_due(cfg.sample.every, done, cfg.rounds):
        run.task.write_samples(run, done, logger)
    record["sample_s"] = time.perf_counter() - output_started
    if run.task.supports_evaluation and evaluation_due(cfg, done):
        eval_started = time.perf_counter()
        record.update(run.task.evaluate(run, done, logger))
        record["eval_s"] = time.perf_counter() - eval_started
    checkpoint_started = time.perf_counter()
    if is_due(cfg.checkpoint.every, done, cfg.rounds):
        write_checkpoint(run, done, record, checkpoint_groups(), checkpoint_state)
        if after_checkpoint is not None:
            after_checkpoint()
    record["checkpoint_s"] = time.perf_counter() - checkpoint_started
    record["round_time_s"] = time.perf_counter() - started
    logger.log(record)
    logger.progress(done, loss=record["train_loss"], round_s=record["round_time_s"],
                    **({"fid": record["fid"]} if "fid" in record else {}))
    return record


def write_checkpoint(run: Run, done_rounds: int, record: Optional[dict] = None,
                     extra_groups: Optional[Dict[str, dict]] = None,
                     extra_state: Optional[dict] = None) -> Path:
    """Global weights, EMA, ``extra_groups`` (server, optimizer, ...) and the round's metrics."""
    state: Dict[str, Any] = {
        "config_digest": digest(run.cfg),
        "config": digest_view(run.cfg),
        "ema_updates": run.ema.updates,
        "samples_seen": run.progress.samples_seen,
        "bytes_total": run.progress.bytes_total,
        "bytes_up_total": run.progress.bytes_up_total,
        "bytes_down_total": run.progress.bytes_down_total,
        "world_size": run.world_size,
        # All randomness is derived from (seed, round) and (seed, client, round): there is no
        # hidden generator state to save, which is why a resumed run equals an uninterrupted one.
        "rng": {"scheme": "derived per (seed, client, round)", "seed": run.cfg.seed},
        # The round's metrics (its timings are still running): restored on resume if the process
        # dies between this checkpoint and the metrics.jsonl line, so the log stays complete.
        "metrics_record": jsonable(record) if record is not None else None,
        **(extra_state or {}),
    }
    groups = {
        "model": run.params.state_dict(run.global_weights),
        "ema": run.params.state_dict(run.ema.shadow),
        **(extra_groups or {}),
    }
    return save_checkpoint(Path(run.cfg.output_dir), done_rounds, groups, state,
                           run.cfg.checkpoint.keep_last)


def export_final(run: Run) -> Path:
    """final/: the task's export (a stock diffusers folder), written under a temporary name."""
    import shutil

    out = Path(run.cfg.output_dir) / "final"
    tmp = out.with_name(".final.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    run.task.export(run, tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out
