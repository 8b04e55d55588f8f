"""The federated round loop over torchrun ranks, written as numbered steps.

    Step 1  cohort: the sampled clients of this round (same on every rank), minus those that
            drop out (faults.dropout), dealt to ranks
    Step 2  local training: each rank runs the client algorithm for each of its clients from the
            global weights; each update (local - global) is encoded and decoded by the uplink
            codec (aggregation.uplink), passes the update transforms and is added, weighted, to
            the round buffer (exactly, with aggregation.exact)
    Step 3  ONE all_reduce(SUM) of the flat buffer [sum n_c delta_c, algorithm segments, sum n_c,
            stats]; a rank that hangs makes it fail after dist_timeout_s with an error naming
            the round
    Step 4  server transforms on the reduced sum, then the server strategy's step (its change of
            the model passed through the downlink codec, aggregation.downlink) and the client
            algorithm's server-side update (every rank, identically), EMA update
    Step 5  rank 0: log, sample grid, evaluation (FID/KID every eval.every rounds), checkpoint;
            every rank: stop if every update was rejected for faults.max_rejected_rounds rounds

The seams (client algorithm, update transforms, server transforms, server strategy) are found
through their registries (``fedrun.registry``); the task (what is trained) too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from fedrun.config import Config
from fedrun.engine import dist
from fedrun.engine.checkpoint import list_checkpoints, load_checkpoint
from fedrun.engine.client_state import ClientStateStore
from fedrun.engine.cohort import assign_to_ranks, dropped_clients, sample_cohort
from fedrun.engine.ema import EMA
from fedrun.engine.metrics import RunLogger
from fedrun.engine.run import (STOPPED_FILE, Run, device_memory, drive, open_run, restore_run,
                               start_logging, write_outputs)
from fedrun.errors import CheckpointError, ConfigError, DistributedError, TrainingError
from fedrun.fl.aggregation.buffer import (BYTES_PER_FLOAT, RoundBuffer, RoundResult, client_weight,
                                          weighted_loss)
from fedrun.fl.aggregation.codecs import Channel, build_channel
from fedrun.fl.aggregation.partial import Exchange, build_exchange
from fedrun.fl.aggregation.exact import ExactGrid
from fedrun.fl.aggregation.transforms import (RoundInfo, ServerTransform, UpdateInfo,
                                              UpdateTransform, build_server_transforms,
                                              build_update_transforms)
from fedrun.fl.clients import ClientAlgorithm, build_client_algorithm
from fedrun.fl.local import (OPTIM_PREFIX, ClientJob, ClientResult, batch_indices, client_generator,
                             num_local_steps)
from fedrun.fl.vectorized import GroupTrainer, client_groups, deal_groups, draw_client_steps, stack_steps
from fedrun.fl.privacy.accountant import PrivacySpec, privacy_spec, write_privacy_file
from fedrun.fl.privacy.adaptive import ClipNorm
from fedrun.fl.privacy.preflight import Preflight, privacy_preflight
from fedrun.fl.privacy.transforms import share_clip_norm
from fedrun.fl.strategies import ServerStrategy, build_server
from fedrun.rng import derived_generator
from fedrun.tasks.base import Task, build_task

_UPLINK_STREAM = 0xC0DE  # the uplink codec's randomness: (seed, round, client, tag)
_DOWNLINK_STREAM = 0xD0C0  # the downlink codec's: (seed, round, tag), the same on every rank
UPLINK_RESIDUAL = "uplink_residual"  # the client state store's key of the error feedback
PERSONAL = "personal"  # ... and of a client's personal parts (aggregation.shared)


@dataclass(frozen=True)
class Seams:
    """The pluggable pieces of a federated round, built from the config (the same on every
    rank)."""

    server: ServerStrategy
    algorithm: ClientAlgorithm
    update_transforms: List[UpdateTransform]
    server_transforms: List[ServerTransform]
    uplink: Channel  # aggregation.uplink: the clients' messages
    downlink: Channel  # aggregation.downlink: the round's change of the model
    privacy: Optional[PrivacySpec] = None  # DP-FedAvg's parameters (privacy.enabled)
    clip_norm: Optional[ClipNorm] = None  # DP's clip norm in use (moves: privacy.clip_quantile)

    @property
    def keeps_client_state(self) -> bool:
        """Whether clients keep state between their rounds (the client state store)."""
        return self.algorithm.stateful or self.uplink.error_feedback



def build_seams(cfg: Config) -> Seams:
    """Every seam of ``cfg``; DP's sigma is calibrated (or an unreachable budget refused) here,
    before anything is built."""
    update_transforms, server_transforms = build_update_transforms(cfg), build_server_transforms(cfg)
    return Seams(server=build_server(cfg.server), algorithm=build_client_algorithm(cfg),
                 update_transforms=update_transforms, server_transforms=server_transforms,
                 privacy=privacy_spec(cfg) if cfg.privacy.enabled else None,
                 clip_norm=share_clip_norm(update_transforms, server_transforms),
                 uplink=build_channel(cfg.aggregation.uplink),
                 downlink=build_channel(cfg.aggregation.downlink))


@dataclass
class Tracking:
    """What the federation tracks between rounds besides the model (every rank alike)."""

    #: client -> the round (1-based) whose state it stored last: every rank knows it from the
    #: reduced rounds, so a missing state file is an error, not a silent fresh start
    state_versions: Dict[int, int] = field(default_factory=dict)
    #: the consecutive rounds, up to now, in which every client update was rejected:
    #: [[round, {client: reason}], ...] (faults.max_rejected_rounds stops the run)
    rejected_streak: List[list] = field(default_factory=list)
    #: client -> the round (0-based) whose global model it last received: the downlink bytes of
    #: its next round are the messages it missed since (at most the whole model)
    synced: Dict[int, int] = field(default_factory=dict)
    #: usplit: client -> the parts it sends this round
    assignment: Dict[int, List[str]] = field(default_factory=dict)
    round_buffer: Optional[RoundBuffer] = None  # reused every round (no per-round allocation)


@dataclass(frozen=True)
class Federation:
    """A federated run: the run, its seams, what of the vector travels, the client state store
    (when clients keep state) and what is tracked between rounds."""

    run: Run
    seams: Seams
    exchange: Exchange  # what of the vector travels (aggregation.shared)
    store: Optional[ClientStateStore] = None
    tracking: Tracking = field(default_factory=Tracking)
    vectorized: Optional[GroupTrainer] = None  # client.vectorize: trains a group of clients at once
    preflight: Optional[Preflight] = None  # DP's signal-against-noise check, from the initial weights


# ---------------------------------------------------------------- set-up

def setup(cfg: Config, task: Optional[Task] = None) -> Federation:
    """Run directory, data, partition, model and the seams: ready for round 0 (or resumed).
    ``task`` defaults to the config's (``task.name``)."""
    task = task or build_task(cfg)
    seams = build_seams(cfg)
    run = open_run(cfg, task)
    if seams.privacy is not None and seams.algorithm.segments(run.params):
        raise ConfigError(f"config key 'client.algorithm': '{seams.algorithm.name}' sends buffer "
                          "segments besides the update, which DP-FedAvg (privacy.enabled) does "
                          "not privatize")
    exchange = build_exchange(cfg, run.params, run.global_weights)  # before a restore
    keeps_state = (seams.keeps_client_state or exchange.personal is not None
                   or task.keeps_client_state())
    store = ClientStateStore(Path(cfg.output_dir)) if keeps_state else None
    vectorized = (GroupTrainer(task.functional_model(run.model), run.params, task.step_loss, cfg.optim)
                  if cfg.client.vectorize else None)
    preflight = (privacy_preflight(seams.privacy, cfg.rounds, run.global_weights, run.model)
                 if seams.privacy is not None else None)  # before a restore: the initial weights
    fed = Federation(run, seams, exchange, store, vectorized=vectorized, preflight=preflight)
    if run.resume_from is not None:
        restore(fed, load_checkpoint(run.resume_from))
    return fed


def restore(fed: Federation, ckpt) -> None:
    """The run's state plus the server's, the client algorithm's and what is tracked."""
    run, seams = fed.run, fed.seams
    restore_run(run, ckpt)
    saved_sigma = ckpt.state.get("privacy_noise_multiplier")
    sigma = seams.privacy.noise_multiplier if seams.privacy is not None else None
    if saved_sigma != sigma:
        raise CheckpointError(
            f"checkpoint '{ckpt.path}' was trained with noise multiplier {saved_sigma}, this config "
            f"gives {sigma}: privacy.target_epsilon calibrates sigma for 'rounds', so a DP run "
            "resumes only with the 'rounds' it was calibrated for (its past rounds would otherwise "
            "be accounted with the wrong sigma)")
    if seams.privacy is not None and seams.privacy.adaptive is not None:
        seams.clip_norm.value = float(ckpt.state["privacy_clip_norm"])  # the next round's clip
    if fed.store is not None and ckpt.path.resolve().parent.parent != Path(run.cfg.output_dir).resolve():
        raise CheckpointError(f"checkpoint '{ckpt.path}' belongs to another run directory, and "
                              f"client algorithm '{seams.algorithm.name}' keeps per-client state "
                              "in the run directory: copy that whole run and resume it there")
    if fed.store is not None:
        saved = ckpt.state.get("client_state_versions")
        fed.tracking.state_versions = ({int(c): int(v) for c, v in saved.items()} if saved is not None
                                       else fed.store.newest_versions(ckpt.round))  # older checkpoints
    fed.tracking.rejected_streak = [list(item) for item in ckpt.state.get("rejected_streak", [])]
    fed.tracking.synced = {int(c): int(r) for c, r in (ckpt.state.get("downlink_synced") or {}).items()}
    seams.downlink.load_state_dict({k: v.to(run.device) for k, v in ckpt.groups.get("downlink", {}).items()})
    seams.server.load_state_dict({k: v.to(run.device) for k, v in ckpt.groups.get("server", {}).items()})
    seams.algorithm.load_state_dict({k: v.to(run.device)
                                     for k, v in ckpt.groups.get("client_algorithm", {}).items()})


# ---------------------------------------------------------------- one round

def select_clients(fed: Federation, global_round: int) -> tuple[list, list, list]:
    """Step 1: the cohort (same on every rank), the clients of it that drop out of this round,
    and the surviving clients this rank trains."""
    run, cfg = fed.run, fed.run.cfg
    sampling = cfg.privacy.sampling if cfg.privacy.enabled else "fixed"
    cohort = sample_cohort(cfg.num_clients, cfg.cohort_size, cfg.seed, global_round, sampling)
    dropped = dropped_clients(cohort, cfg.faults.dropout, cfg.faults.dropout_schedule, cfg.seed,
                              global_round)
    survivors = [c for c in cohort if c not in dropped]
    costs = [client_steps(run, c) for c in survivors]
    if cfg.client.vectorize:  # whole groups, fixed whatever the world size
        return cohort, dropped, deal_groups(survivors, costs, cfg.client.vectorize, run.world_size)[run.rank]
    return cohort, dropped, assign_to_ranks(survivors, run.world_size, costs)[run.rank]


def client_steps(run: Run, client: int) -> int:
    """Local optimizer steps of ``client`` per round (local_steps, or from local_epochs)."""
    cfg = run.cfg
    return num_local_steps(len(run.client_indices[client]), cfg.optim.batch_size,
                           cfg.local_steps, cfg.local_epochs)


def _weight(run: Run, client: int) -> float:
    return client_weight(len(run.client_indices[client]), run.cfg.server.weighting)


def new_round_buffer(fed: Federation, cohort: list) -> RoundBuffer:
    """This round's buffer (last round's storage reused), with exact grids when asked for: the
    update's grid follows the global weights, a segment's its reference; the weight bound is the
    cohort's total weight. Every input is the same on every rank."""
    run, cfg = fed.run, fed.run.cfg
    segments = fed.seams.algorithm.segments(run.params) + run.task.segments(run)
    exact = None
    if cfg.aggregation.exact:
        bound = sum(_weight(run, c) for c in cohort)
        rounding = cfg.aggregation.rounding
        exact = {"update": ExactGrid(run.params.numel, run.global_weights, bound, run.device,
                                     rounding)}
        exact.update({s.name: ExactGrid(s.numel, s.reference, bound if s.weighted else len(cohort),
                                        run.device, rounding)
                      for s in segments})
    buffer = RoundBuffer(run.params.numel, cohort, run.world_size, run.device,
                         reuse=fed.tracking.round_buffer, segments=segments, exact=exact,
                         transforms=fed.seams.update_transforms,
                         scalars=[s for t in fed.seams.update_transforms for s in t.scalar_slots])
    fed.tracking.round_buffer = buffer
    return buffer


def train_local(fed: Federation, cohort: list, mine: list, global_round: int) -> RoundBuffer:
    """Step 2: run the client algorithm for this rank's clients, each from the global weights,
    into the round buffer: one after another, or (client.vectorize) a group of clients at once,
    whose weights then enter the buffer one by one as a sequential client's do."""
    run = fed.run
    buffer = new_round_buffer(fed, cohort)
    started = time.perf_counter()
    if fed.vectorized is None:
        for client in mine:
            _train_client(fed, buffer, client, global_round)
    else:  # the groups select_clients dealt to this rank (cut again, they come back whole)
        steps = [client_steps(run, client) for client in mine]
        for group in client_groups(mine, steps, run.cfg.client.vectorize):
            _train_group(fed, buffer, group, global_round)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    buffer.set_compute_time(run.rank, time.perf_counter() - started)
    return buffer


@dataclass
class _ClientStart:
    """A client ready to train (the replica holds its starting weights)."""

    client: int
    generator: torch.Generator  # its (seed, client, round) stream, the batches already drawn
    batches: np.ndarray  # (steps, batch) sample indices
    state: Optional[Dict[str, torch.Tensor]]  # its stored state, less what the engine keeps
    residual: Optional[torch.Tensor]  # the uplink's error feedback


def _start_client(fed: Federation, client: int, global_round: int) -> _ClientStart:
    """The global weights (with the client's personal parts) into the replica, the client's
    generator, batches and stored state, and the task's start."""
    run, cfg, store, exchange = fed.run, fed.run.cfg, fed.store, fed.exchange
    run.params.load_(run.global_weights)
    generator = client_generator(cfg.seed, client, global_round)
    batches = batch_indices(run.client_indices[client], client_steps(run, client),
                            cfg.optim.batch_size, generator)
    state = (store.load(client, global_round, fed.tracking.state_versions.get(client))
             if store is not None else None)
    residual = state.pop(UPLINK_RESIDUAL, None) if state is not None else None
    if exchange.personal is not None:  # the client's own parts (the initial ones at first)
        personal = state.pop(PERSONAL, None) if state is not None else None
        run.params.flat[exchange.personal] = (personal.to(run.device) if personal is not None
                                              else exchange.initial_personal)
    run.task.start_client(run, client, global_round, state)
    return _ClientStart(client, generator, batches, state, residual)


def _client_job(fed: Federation, start: _ClientStart, global_round: int) -> ClientJob:
    run, cfg, algorithm = fed.run, fed.run.cfg, fed.seams.algorithm
    return ClientJob(start.client, global_round, run.model, run.params, run.global_weights,
                     start.batches, start.generator, run.task.loss, cfg.optim, run.device,
                     cfg.precision, start.state if algorithm.stateful and start.state else None)


def _train_client(fed: Federation, buffer: RoundBuffer, client: int, global_round: int) -> None:
    """One client: the client algorithm from the global weights, then its contribution."""
    start = _start_client(fed, client, global_round)
    result = fed.seams.algorithm.train(_client_job(fed, start, global_round))
    _contribute(fed, buffer, start, result, global_round)


def _train_group(fed: Federation, buffer: RoundBuffer, group: List[int], global_round: int) -> None:
    """A group of clients with equal step counts trained at once (``fedrun.fl.vectorized``):
    each one's starting weights, drawn inputs and gradient term (``ClientAlgorithm.grad_term``)
    as a sequential client's, then each one's final weights through the replica, the
    algorithm's ``finish`` and into the buffer."""
    run, algorithm = fed.run, fed.seams.algorithm
    starts = torch.empty(len(group), run.params.numel, device=run.device)
    begun, jobs, terms, draws = [], [], [], []
    for row, client in enumerate(group):
        begun.append(_start_client(fed, client, global_round))
        starts[row].copy_(run.params.flat)
        jobs.append(_client_job(fed, begun[-1], global_round))
        terms.append(algorithm.grad_term(jobs[-1]))
        draws.append(draw_client_steps(run.task.draw_step, begun[-1].batches, begun[-1].generator))
    states = None
    if run.cfg.client.stateful_optimizer:  # each client's stored optimizer state (None: fresh)
        states = [{k: v for k, v in job.state.items() if k.startswith(OPTIM_PREFIX)} if job.state else None
                  for job in jobs]
    finals, losses, kept = fed.vectorized.train(starts, stack_steps(draws), terms, states)
    for row, (start, job, term, final, loss) in enumerate(zip(begun, jobs, terms, finals, losses)):
        run.params.load_(final)
        result = ClientResult(loss, int(start.batches.size), state=kept[row] if kept is not None else None)
        _contribute(fed, buffer, start, algorithm.finish(job, result, term), global_round)


def _contribute(fed: Federation, buffer: RoundBuffer, start: _ClientStart, result: ClientResult,
                global_round: int) -> None:
    """With the client's trained weights in the replica: the task's extras, the uplink, the
    update transforms and the weighted sum (``RoundBuffer.add_client``), then its new state."""
    run, cfg, store, exchange, client = fed.run, fed.run.cfg, fed.store, fed.exchange, start.client
    if [global_round + 1, client] in cfg.faults.nonfinite_schedule:  # simulated corruption
        run.params.flat[0] = float("nan")
    weight = _weight(run, client)
    segments, new_state = _with_task_extras(
        result, run.task.finish_client(run, client, weight, global_round))
    info = UpdateInfo(client, global_round, cfg.seed, weight, result.mean_loss)
    uplink = _Uplink(fed.seams.uplink, cfg.seed, global_round, client, start.residual,
                     exchange.sent(fed.tracking.assignment.get(client)))
    if buffer.add_client(client, run.params.flat, run.global_weights, weight, result.mean_loss,
                         result.samples, info=info, segments=segments,
                         uplink=uplink if uplink.needed else None):
        new_state = dict(new_state or {})
        if uplink.residual is not None:
            new_state[UPLINK_RESIDUAL] = uplink.residual
        if exchange.personal is not None:
            new_state[PERSONAL] = run.params.flat[exchange.personal].clone()
        if store is not None and new_state:
            store.save(client, global_round + 1, new_state)
            if cfg.checkpoint.every == 0:
                # no periodic checkpoint can need an older version (the final one reads the
                # newest): keep one per client, so the disk holds C x state, not
                # rounds x K x state. With periodic checkpoints, rank 0 prunes after each
                # (``_prune_client_states``): a rule that reads the checkpoint folder here
                # would depend on how far rank 0 has got, and differ between ranks.
                store.prune(global_round + 1, clients=[client])
        run.task.observe_client(run, client, weight, global_round)


class _Uplink:
    """One client's message through the uplink codec: the (seed, round, client) stream, the
    error feedback's residual before and after, and the coordinates it sends (``sent``, None:
    all; the others are zeroed: they do not reach the server)."""

    def __init__(self, channel: Channel, seed: int, global_round: int, client: int,
                 residual: Optional[torch.Tensor], sent: Optional[torch.Tensor] = None):
        self.channel, self.keys = channel, (seed, global_round, client, _UPLINK_STREAM)
        self.residual, self.sent = residual, sent

    @property
    def needed(self) -> bool:
        return not self.channel.lossless or self.sent is not None

    def __call__(self, delta: torch.Tensor) -> None:
        generator = (derived_generator(*self.keys, device=delta.device)
                     if self.channel.codec.random else None)
        residual = self.residual.to(delta.device) if self.residual is not None else None
        _, self.residual = self.channel.transmit_(delta, generator, residual, self.sent)


def _with_task_extras(result, extras) -> tuple:
    """The client's buffer segments and new state: the algorithm's plus the task's."""
    if extras is None:
        return result.segments, result.state
    state = result.state if extras.state is None else {**(result.state or {}), **extras.state}
    return {**result.segments, **extras.segments}, state


def reduce_round(buffer: RoundBuffer, global_round: int) -> RoundResult:
    """Step 3: ONE all-reduce of the flat buffer, decoded; a failure names the round."""
    try:
        dist.all_reduce_sum(buffer.buffer)
    except DistributedError as exc:
        raise DistributedError(f"round {global_round + 1}: {exc}") from exc
    return buffer.decode()


def server_update(seams: Seams, weights: torch.Tensor, ema: EMA, result: RoundResult,
                  global_round: int, seed: int,
                  shared: Optional[torch.Tensor] = None,
                  task_step: Optional[Callable[[RoundResult], None]] = None) -> tuple[bool, dict]:
    """Step 4: server transforms, the server step, the task's server step (``task_step``), the
    client algorithm's server-side update and the EMA (a round where no weight arrived keeps the
    model). ``shared``: the coordinates the clients receive (None: all), the only ones the
    downlink carries and the step may move. Returns (updated, metrics)."""
    # Under DP every round releases noise (also one whose Poisson cohort is empty) and the sum is
    # divided by the expected cohort size, not by the data-dependent count (``fedrun.fl.privacy``).
    if result.total_weight <= 0 and seams.privacy is None:
        return False, {}
    info = RoundInfo(global_round, seed, result.total_weight,
                     accepted=sum(1 for w in result.client_weight.values() if w > 0),
                     scalars=result.scalars)
    metrics: dict = {}
    for transform in seams.server_transforms:
        metrics.update(transform(result.update_sum, info))
    denominator = seams.privacy.clients_per_round if seams.privacy is not None else result.total_weight
    before = None if seams.downlink.lossless else weights.clone()
    seams.server.step(weights, result.update_sum, denominator)
    if task_step is not None:
        task_step(result)
    if before is not None:  # what the clients decode is what the server keeps
        change = weights.sub_(before)
        generator = (derived_generator(seed, global_round, _DOWNLINK_STREAM, device=weights.device)
                     if seams.downlink.codec.random else None)
        seams.downlink.transmit_server_(change, generator, shared)
        weights.add_(before)
    seams.algorithm.server_update(result)
    ema.update(weights)
    return True, metrics


def show_personal_model(fed: Federation, result: RoundResult) -> None:
    """With personal parts: after a round in which ``aggregation.personal_client`` trained, its
    personal parts (from the client state store, on every rank) overwrite the server's copy of
    them in the global and EMA vectors -- no client reads those -- so that sampling, evaluation,
    checkpoints and the export show that client's model."""
    exchange, run = fed.exchange, fed.run
    client = exchange.personal_client
    if exchange.personal is None or result.client_weight.get(client, 0.0) <= 0:
        return
    version = fed.tracking.state_versions[client]
    state = fed.store.load(client, version, version)
    values = state[PERSONAL].to(run.device)
    run.global_weights[exchange.personal] = values
    run.ema.shadow[exchange.personal] = values


def track_states_and_rejections(fed: Federation, result: RoundResult, global_round: int) -> None:
    """After the all-reduce, on every rank: which clients now have a newer stored state, and
    whether this round extends a run of rounds in which every update was rejected."""
    accepted = [c for c, w in result.client_weight.items() if w > 0]
    tracking = fed.tracking
    if fed.store is not None:
        tracking.state_versions.update({c: global_round + 1 for c in accepted})
    if accepted:
        tracking.rejected_streak = []
    elif result.rejected:  # clients sent updates and none was taken
        tracking.rejected_streak.append([global_round + 1, dict(result.rejected_by)])


_REJECTION_HINTS = {
    "exact_range": "The updates are far larger than the weights (a diverging client): lower "
                   "optim.lr, or check the data.",
    "nonfinite_guard": "The local training produced NaN or infinity: lower optim.lr, set "
                       "optim.grad_clip, or check the data.",
}


def check_can_learn(fed: Federation) -> None:
    """Stop (on every rank: they all saw the same reduced rounds) once every client update has
    been rejected for faults.max_rejected_rounds consecutive rounds."""
    limit = fed.run.cfg.faults.max_rejected_rounds
    streak = fed.tracking.rejected_streak
    if limit <= 0 or len(streak) < limit:
        return
    rounds = [r for r, _ in streak]
    reasons: Dict[str, int] = {}
    for _, rejected in streak:
        for why in rejected.values():
            reasons[why] = reasons.get(why, 0) + 1
    message = (f"every client update was rejected in {len(rounds)} consecutive rounds "
               f"({rounds[0]}-{rounds[-1]}; rejections: "
               + ", ".join(f"{why} x{n}" for why, n in sorted(reasons.items()))
               + f"), so the model cannot learn (faults.max_rejected_rounds={limit}). "
               + _REJECTION_HINTS.get(max(reasons, key=reasons.get).split(":")[0], ""))
    if fed.run.rank == 0:  # the run's verdict, for the experiment runner: do not start it again
        from fedrun.engine.checkpoint import atomic_write_text

        atomic_write_text(Path(fed.run.cfg.output_dir) / STOPPED_FILE, json.dumps(
            {"reason": "cannot learn", "round": rounds[-1], "error": message}))
    raise TrainingError(message)


def client_bytes(fed: Federation, result: RoundResult, global_round: int) -> tuple[dict, dict]:
    """Bytes each client that sent an update this round sent (uplink) and received (downlink),
    and mark it as holding this round's model (every rank alike).

    Uplink: the codec's message of its update plus the algorithm's segments in fp32 (e.g.
    SCAFFOLD's variate change). Downlink: the global model reaches a client as the downlink
    messages of the rounds since it last took part (one message per round, each the codec's
    encoding of that round's change), or whole in fp32 when that is smaller or it never took
    part; plus the algorithm's segments in fp32 (SCAFFOLD's server variate). Only the
    coordinates that travel count (``aggregation.shared``: the shared parts both ways; usplit:
    the whole model down, the client's parts up). With the default fp32 codecs and a full
    exchange that is the whole vector both ways."""
    exchange = fed.exchange
    segment_bytes = BYTES_PER_FLOAT * sum(s.numel() for s in result.segments.values())
    received = exchange.received_numel()
    full = BYTES_PER_FLOAT * received
    message = fed.seams.downlink.message_bytes(received)
    synced = fed.tracking.synced
    up, down = {}, {}
    # a rejected update was sent, then refused: it is counted here, updates_applied not
    for client in sorted(c for c, w in result.client_weight.items() if w > 0 or c in result.rejected_by):
        last = synced.get(client)
        down[client] = (full if last is None else min(full, (global_round - last) * message)) + segment_bytes
        sent = exchange.sent_numel(fed.tracking.assignment.get(client))
        up[client] = fed.seams.uplink.message_bytes(sent) + segment_bytes
        synced[client] = global_round
        counted = fed.run.task.client_bytes(fed.run, client, result)
        if counted is not None:  # the task's own protocol (LoRA variants)
            up[client], down[client] = counted
    return up, down


def account(fed: Federation, result: RoundResult, global_round: int) -> dict:
    """Samples and bytes of the round (every rank keeps the totals: they are checkpointed).

    Bytes are the protocol's (``client_bytes``). How the simulator sums the updates (exact mode:
    float64 fixed point) is not counted; ``buffer_bytes`` is the simulator's all-reduce payload
    per rank."""
    run, progress = fed.run, fed.run.progress
    trained = [c for c, w in result.client_weight.items() if w > 0]
    round_samples = sum(result.client_samples.values())
    up, down = client_bytes(fed, result, global_round)
    round_up, round_down = sum(up.values()), sum(down.values())
    round_bytes = round_up + round_down
    progress.samples_seen += round_samples
    progress.bytes_total += round_bytes
    progress.bytes_up_total += round_up
    progress.bytes_down_total += round_down
    floats = run.params.numel + sum(s.numel() for s in result.segments.values())
    buffer = fed.tracking.round_buffer.buffer
    return {
        "samples": progress.samples_seen,
        "round_samples": round_samples,
        "train_loss": weighted_loss(result),
        "clients": trained,
        "client_loss": {c: result.client_loss[c] for c in trained},
        "client_samples": {c: result.client_samples[c] for c in trained},
        "rejected_nonfinite": [c for c, why in result.rejected_by.items() if why == "nonfinite_guard"],
        "rejected": result.rejected_by,
        "updates_applied": len(trained),
        # per client (the mean when they differ; an fp32 vector when no client sent)
        "bytes_sent_per_client": round_up // len(up) if up else fed.seams.uplink.message_bytes(
            run.params.numel) + BYTES_PER_FLOAT * (floats - run.params.numel),
        "bytes_received_per_client": round_down // len(down) if down else BYTES_PER_FLOAT * floats,
        "bytes_up_per_client": up,
        "bytes_down_per_client": down,
        "bytes_up": round_up,
        "bytes_down": round_down,
        "bytes_up_total": progress.bytes_up_total,
        "bytes_down_total": progress.bytes_down_total,
        "bytes_round": round_bytes,
        "bytes_total": progress.bytes_total,
        "buffer_bytes": buffer.numel() * buffer.element_size(),
        "local_compute_s": max(result.rank_compute_s),
        "local_compute_s_per_rank": result.rank_compute_s,
        **device_memory(run.device),
    }


def run_round(fed: Federation, global_round: int, logger: RunLogger) -> dict:
    """One round; returns its metrics record (complete on rank 0)."""
    run = fed.run
    started = time.perf_counter()
    # Step 1: cohort, minus the clients that dropped out (usplit: who sends which part)
    cohort, dropped, mine = select_clients(fed, global_round)
    fed.tracking.assignment = fed.exchange.assignment([c for c in cohort if c not in dropped],
                                                     run.cfg.seed, global_round)
    # Step 2: local training
    buffer = train_local(fed, cohort, mine, global_round)
    # Step 3: one all-reduce of the flat buffer
    reduce_started = time.perf_counter()
    result = reduce_round(buffer, global_round)
    aggregation_s = time.perf_counter() - reduce_started
    # the task's metrics of the reduced round, before the server step (may be collective)
    task_metrics = run.task.round_metrics(run, global_round, result)
    # Step 4: server step
    server_started = time.perf_counter()
    if fed.exchange.split:  # each part's mean over the clients that sent it
        reporters: Dict[str, float] = {}
        for client, parts in fed.tracking.assignment.items():
            for part in parts:
                reporters[part] = reporters.get(part, 0.0) + result.client_weight.get(client, 0.0)
        fed.exchange.rescale_(result.update_sum, result.total_weight, reporters)
    updated, server_metrics = server_update(fed.seams, run.global_weights, run.ema, result,
                                            global_round, run.cfg.seed, fed.exchange.shared,
                                            task_step=lambda reduced: run.task.server_step(run, reduced))
    track_states_and_rejections(fed, result, global_round)
    show_personal_model(fed, result)
    done = global_round + 1
    record = {"round": done, **account(fed, result, global_round), **task_metrics, **server_metrics,
              "dropped": dropped, "model_updated": updated, "aggregation_s": aggregation_s,
              "server_s": time.perf_counter() - server_started}
    # Step 5: log / sample / evaluate / checkpoint (rank 0); stop if the run cannot learn
    if run.rank != 0:
        check_can_learn(fed)
        return record
    if result.rejected:
        logger.write(f"round {done}: rejected the update of "
                     + ", ".join(f"client {c} ({why})" for c, why in result.rejected_by.items()))
    if not updated:
        logger.write(f"round {done}: no client update arrived; the global model is unchanged")
    elif not record["updates_applied"]:
        logger.write(f"round {done}: no client update was applied (the model moved by the DP "
                     "noise only)")
    record = write_outputs(run, done, record, logger, started,
                           checkpoint_groups=lambda: _checkpoint_groups(fed),
                           checkpoint_state=_checkpoint_state(fed),
                           after_checkpoint=lambda: _prune_client_states(fed))
    check_can_learn(fed)
    return record


def _checkpoint_groups(fed: Federation) -> dict:
    downlink = fed.seams.downlink.state_dict()  # error feedback's residual, if any
    return {"server": fed.seams.server.state_dict(),
            "client_algorithm": fed.seams.algorithm.state_dict(),
            **({"downlink": downlink} if downlink else {})}


def _checkpoint_state(fed: Federation) -> dict:
    seams, tracking = fed.seams, fed.tracking
    return {"client_algorithm": seams.algorithm.name,
            "client_state_store": fed.store is not None,
            "client_state_versions": ({str(c): v for c, v in sorted(tracking.state_versions.items())}
                                      if fed.store is not None else None),
            "rejected_streak": tracking.rejected_streak,
            "downlink_synced": {str(c): r for c, r in sorted(tracking.synced.items())},
            "privacy_noise_multiplier": (seams.privacy.noise_multiplier
                                         if seams.privacy is not None else None),
            # adaptive clipping's clip norm for the next round (a JSON float: exact)
            **({"privacy_clip_norm": seams.clip_norm.value}
               if seams.privacy is not None and seams.privacy.adaptive is not None else {})}


def _prune_client_states(fed: Federation) -> None:
    kept = list_checkpoints(Path(fed.run.cfg.output_dir))
    if fed.store is not None and kept:
        fed.store.prune(kept[0][0])


# ---------------------------------------------------------------- the loop

def run(cfg: Config, task: Optional[Task] = None) -> Path:
    """Train ``cfg.rounds`` federated rounds of ``task`` (default: the config's); returns the
    run directory. Joins (and afterwards leaves) the torchrun process group if there is one."""
    task = task or build_task(cfg)
    with dist.session(cfg.device, cfg.dist_timeout_s, cfg.threads):
        fed = setup(cfg, task)
        exact = "exact aggregation" if cfg.aggregation.exact else "fp32 aggregation"
        exact += "".join(f", {way} {_describe_channel(getattr(cfg.aggregation, way))}"
                         for way in ("uplink", "downlink")
                         if getattr(cfg.aggregation, way).name != "fp32")
        logger = start_logging(fed.run, "train",
                               f"task {task.name}: {task.describe(fed.run)}, {cfg.num_clients} clients "
                               f"({cfg.cohort_size} per round), {fed.run.params.numel:,} federated "
                               f"parameters, client algorithm {fed.seams.algorithm.name}"
                               + (f" (vectorized: groups of {cfg.client.vectorize})"
                                  if cfg.client.vectorize else "") + ", server "
                               f"{cfg.server.strategy}, {exact}")
        if fed.preflight is not None and fed.run.progress.start_round == 0:
            for line in fed.preflight.lines():
                logger.write(line)
        return drive(fed.run, logger, lambda global_round: run_round(fed, global_round, logger),
                     finalize=lambda: _finalize_privacy(fed))


def _describe_channel(section) -> str:
    params = {k: v for k, v in vars(section).items() if k not in ("name", "error_feedback")}
    return (section.name + "".join(f" {k}={v}" for k, v in params.items())
            + (" with error feedback" if section.error_feedback else ""))


def _finalize_privacy(fed: Federation) -> dict:
    """final/privacy.json and the summary's guarantee (rank 0, after the export)."""
    spec = fed.seams.privacy
    if spec is None:
        return {}
    extra = {"preflight": fed.preflight.as_dict()}
    if spec.adaptive is not None:
        extra["adaptive_clipping"] = {"final_clip_norm": fed.seams.clip_norm.value}
    report = write_privacy_file(spec, fed.run.cfg.rounds, Path(fed.run.cfg.output_dir) / "final",
                                extra)
    return {"epsilon": report["epsilon"], "epsilon_rdp": report["epsilon_rdp"],
            "epsilon_pld": report["epsilon_pld"], "dp_delta": report["delta"],
            "dp_noise_multiplier": report["noise_multiplier"], "dp_clip_norm": report["clip_norm"]}
