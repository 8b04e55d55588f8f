"""Typed configuration: OmegaConf structured dataclasses, YAML files and ``key=value`` overrides.

Loaded once at the entry point (``load_config``); everything below receives plain dataclasses.
This module holds the core sections; the rest of a config belongs to pieces (``fedrun.registry``):

* a piece's own parameters sit in the section that names it, beside its name: ``server.strategy:
  fedavgm`` with ``server.momentum``, ``partition.method: dirichlet`` with ``partition.alpha``,
  ``data.name: image_folder`` with ``data.root``, ``client.algorithm: fedprox`` with
  ``client.prox_mu``. They are the piece's ``Params`` dataclass, merged into the section's schema
  for the piece the config names, so an unknown or misplaced parameter is an error naming the key
  and the parameters that piece takes;
* a task's sections (``model`` and ``diffusion`` for ``ddpm``, ``finetune`` for ``sd_lora``, ...)
  are top-level keys that only the task named by ``task.name`` accepts.

Every section validates itself in ``__post_init__`` (called by ``OmegaConf.to_object``), so an
impossible value is reported with the full key name before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedrun.errors import ConfigError
from fedrun.registry import (CLIENT_ALGORITHMS, CODECS, DATASETS, FEATURE_EXTRACTORS, PARTITIONERS, SERVER_TRANSFORMS, STRATEGIES, TASKS, UPDATE_TRANSFORMS, ParamError, Registry, load_plugins)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


@dataclass
class DataConfig:
    """Where the images come from (a registered data source) and how they are prepared."""

    name: str = "digits"
    """A registered data source (``fedrun.registry.DATASETS``): 'digits' (scikit-learn's bundled
    8x8 digits, embedded), 'image_folder', 'celeba', 'hf' (a Hugging Face ``datasets`` data set);
    its own keys (``data.root``, ...) sit beside this one."""
    image_size: int = 16
    """Side of the square training images, in pixels."""
    heldout_fraction: float = 0.1
    """Share of the images kept out of training, for evaluation (the FID/KID reference). The
    split is the same for every ``seed`` (``fedrun.data.base.HELDOUT_SPLIT_SEED``); the shipped
    digits classifier never saw a reference image of the digits at this default or below."""
    max_samples: Optional[int] = None
    """Use only a deterministic subset of this many images (quick runs): a fixed part of the
    reference split as held-out set and a seeded choice of the other images for training."""
    classes: Optional[List[int]] = None
    """Keep only the images of these class labels, in training and in the held-out reference
    (a labelled source: the digits, a labelled image folder); e.g. public pre-training on
    [0, 1, 2, 3, 4] and private fine-tuning on [5, 6, 7, 8, 9]. The held-out split is the same
    images as without it, filtered: no held-out image of a kept class ever trains. null = all."""

    def __post_init__(self) -> None:
        _require(self.image_size >= 4, "data.image_size", f"must be >= 4, got {self.image_size}")
        _require(self.classes is None or (len(self.classes) > 0 and len(set(self.classes)) == len(self.classes)
                                          and all(c >= 0 for c in self.classes)),
                 "data.classes", f"must be a non-empty list of distinct labels >= 0, got {self.classes}")
        _require(0.0 <= self.heldout_fraction < 1.0, "data.heldout_fraction",
                 f"must be in [0, 1), got {self.heldout_fraction}")
        _require(self.max_samples is None or self.max_samples >= 1, "data.max_samples",
                 f"must be >= 1, got {self.max_samples}")


@dataclass
class PartitionConfig:
    """How the training images are split among the clients."""

    method: str = "iid"
    """A registered partitioner (``fedrun.registry.PARTITIONERS``): 'iid', 'dirichlet' (label
    skew, ``partition.alpha``), 'shards' (``partition.shards_per_client`` classes per client),
    'unbalanced' (``partition.unbalanced_sigma``)."""


@dataclass
class OptimConfig:
    """The clients' local optimizer: fresh for every client in every round, unless
    ``client.stateful_optimizer`` keeps each client's state across its rounds."""

    name: str = "adamw"
    """'adamw' (betas, weight_decay) or 'sgd' (momentum, weight_decay)."""
    lr: float = 1e-4
    batch_size: int = 16
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    """'adamw' only."""
    momentum: float = 0.9
    """'sgd' only: heavy-ball momentum (0 = plain SGD)."""
    grad_clip: Optional[float] = 1.0
    """Clip the gradient norm to this value (null = no clipping)."""

    def __post_init__(self) -> None:
        _require(self.name in ("adamw", "sgd"), "optim.name", f"must be 'adamw' or 'sgd', got '{self.name}'")
        _require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _require(self.batch_size >= 1, "optim.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(len(self.betas) == 2, "optim.betas", "needs two values")
        _require(0 <= self.momentum < 1, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _require(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip",
                 f"must be > 0 or null, got {self.grad_clip}")


@dataclass
class ServerConfig:
    """The server step applied to the averaged client update."""

    strategy: str = "fedavg"
    """A registered server strategy (``fedrun.registry.STRATEGIES``): 'fedavg' (w += lr * mean
    update), 'fedavgm' (server momentum: ``server.momentum``), or the adaptive optimizers of
    Reddi et al. (2021) 'fedadam', 'fedyogi', 'fedadagrad' (``server.beta1``, ``beta2``,
    ``tau``)."""
    lr: Optional[float] = None
    """Server learning rate; null = the strategy's default: 1.0 for fedavg/fedavgm (1.0 is plain
    FedAvg, the average of the client models), 0.01 for the adaptive strategies."""
    weighting: Optional[str] = None
    """Weight of a client in the average: 'samples' (its data size, as in FedAvg) or 'uniform';
    null = 'samples', or 'uniform' under privacy.enabled (client-level DP weighs every client 1)."""

    def __post_init__(self) -> None:
        _require(self.lr is None or self.lr > 0, "server.lr", f"must be > 0 or null, got {self.lr}")
        _require(self.weighting in (None, "samples", "uniform"), "server.weighting",
                 f"must be 'samples' or 'uniform', got '{self.weighting}'")


@dataclass
class ClientConfig:
    """What a sampled client does with the global weights for its local steps."""

    algorithm: str = "fedavg"
    """A registered client algorithm (``fedrun.registry.CLIENT_ALGORITHMS``): 'fedavg' trains
    local_steps steps of the client optimizer (optim.*) from the global weights; 'fedprox' adds
    the proximal term prox_mu/2 ||w - w_global||^2 to the loss (Li et al. 2020;
    ``client.prox_mu``); 'scaffold' corrects every step with control variates (Karimireddy et
    al. 2020, option II; needs plain SGD)."""
    stateful_optimizer: bool = False
    """Keep each client's optimizer state (AdamW moments, SGD momentum) across its rounds, in the
    client state store; false = a fresh optimizer every round (FedAvg as published)."""
    vectorize: int = 0
    """Vectorized clients (``fedrun.fl.vectorized``): train groups of up to this many clients
    at once with torch.func (vmap over their stacked weights; one optimizer over the stack),
    each with its own (seed, client, round) randomness; the result equals one-by-one training
    up to fp32 rounding. Groups hold clients with equal local step counts and are dealt to
    ranks whole, so 1, 2, 3, ... processes stay bit-identical. Fast for many small clients
    (one image, a few steps); needs a task that splits its loss (ddpm, dit), a client algorithm
    whose steps are the optimizer's plus a gradient term (fedavg, fedprox, scaffold),
    precision=fp32; with stateful_optimizer, AdamW (each client's own step count) or plain
    SGD. 0 = off (one client after another)."""

    def __post_init__(self) -> None:
        _require(self.vectorize >= 0, "client.vectorize",
                 f"must be >= 0 (clients per group; 0 = off), got {self.vectorize}")


@dataclass
class CodecConfig:
    """One direction of the exchange (``fedrun.fl.aggregation.codecs``): the codec's name, its
    parameters beside it, and error feedback."""

    name: str = "fp32"
    """Registered codec (``fedrun.registry.CODECS``): 'fp32' (as it is), 'bf16', 'fp16', 'qsgd'
    (bits, block), 'topk' / 'randk' (fraction)."""
    error_feedback: bool = False
    """Add what the previous messages left out to the next one (the uplink's residual is kept
    per client in the client state store, the downlink's on the server and checkpointed)."""


@dataclass
class AggregationConfig:
    """How the clients' updates are transformed and summed (``fedrun.fl.aggregation``)."""

    exact: bool = True
    """Sum the round's weighted updates exactly (fixed-point integers in a float64 buffer): the
    sum does not depend on which clients share a rank, so 1, 2, 3, ... processes give
    bit-identical models at any clients_per_round. false: plain fp32 sums, half the bytes of
    the all-reduce, equal across world sizes only up to rounding (which Adam amplifies)."""
    update_transforms: List[str] = field(default_factory=lambda: ["nonfinite_guard"])
    """Registered client-update transforms (``fedrun.registry.UPDATE_TRANSFORMS``) applied in
    order to each client's update (local - global) before the weighted sum; one may reject the
    update. 'nonfinite_guard' rejects updates (or losses) holding a NaN or an infinity."""
    rounding: str = "stochastic"
    """Exact mode: how a term is rounded to the fixed-point grid. 'stochastic' (unbiased: up with
    probability equal to the fraction of a grid step, from the (seed, round, client) stream, so
    the sum stays independent of the world size) or 'nearest' (deterministic, biased: a
    coordinate's update below half a grid step is lost every round)."""
    server_transforms: List[str] = field(default_factory=list)
    """Registered server transforms (``fedrun.registry.SERVER_TRANSFORMS``) applied in order
    to the reduced sum of updates before the server step."""
    uplink: CodecConfig = field(default_factory=CodecConfig)
    """How each client's update travels to the server (``aggregation.uplink.name=qsgd
    aggregation.uplink.bits=4``): the server decodes it, then applies the update transforms
    (so DP's clipping bounds what is summed, whatever the codec)."""
    shared: List[str] = field(default_factory=list)
    """Partial exchange (``fedrun.fl.aggregation.partial``): empty = every parameter travels.
    Name patterns (fnmatch, e.g. '*lora_A*', 'up_blocks.*') or the presets 'udec' / 'ulatdec'
    (FedDiffuse: the U-Net's decoder, or middle block and decoder): those parameters travel both
    ways, the others never leave their client (kept per client). 'usplit' (alone): every client
    trains the whole model and sends half of it, paired at random each round."""
    personal_client: int = 0
    """With personal parts (aggregation.shared patterns / udec / ulatdec): the client whose model
    -- the shared parts with its own personal parts -- is sampled, evaluated and exported."""
    downlink: CodecConfig = field(default_factory=CodecConfig)
    """How the round's change of the global model travels to the clients. A lossy codec moves
    the server's model by the decoded change too, so the server holds the model the clients
    decode."""

    def __post_init__(self) -> None:
        _require(self.rounding in ("stochastic", "nearest"), "aggregation.rounding",
                 f"must be 'stochastic' or 'nearest', got '{self.rounding}'")


@dataclass
class EMAConfig:
    """Server-side exponential moving average of the global weights (used for sampling/export)."""

    enabled: bool = True
    decay: float = 0.95
    """Per-round decay d; update r uses min(d, r / (r + 1)), the running mean of the rounds so far
    until it reaches d (after ceil(d / (1 - d)) rounds). The EMA's weights then have a mean age
    of d / (1 - d) rounds (``fedrun.engine.ema.EMA``)."""

    def __post_init__(self) -> None:
        _require(0 <= self.decay < 1, "ema.decay", f"must be in [0, 1), got {self.decay}")


@dataclass
class SampleConfig:
    """Sample grids written to samples/round_NNNNN.png during training."""

    every: int = 0
    """Every this many rounds (0 = only at the end)."""
    num_images: int = 64
    scheduler: str = "ddim"
    """'ddim' (fast) or 'ddpm' (all num_train_timesteps steps)."""
    steps: int = 50
    """DDIM inference steps."""
    seed: int = 1234
    """Sampling noise seed: the same for every grid so grids can be compared."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "sample.every", f"must be >= 0, got {self.every}")
        _require(self.num_images >= 1, "sample.num_images", f"must be >= 1, got {self.num_images}")
        _require(self.scheduler in ("ddim", "ddpm"), "sample.scheduler",
                 f"must be 'ddim' or 'ddpm', got '{self.scheduler}'")
        _require(self.steps >= 1, "sample.steps", f"must be >= 1, got {self.steps}")


@dataclass
class CheckpointConfig:
    every: int = 0
    """Every this many rounds (0 = only at the end). The last round is always checkpointed."""
    keep_last: int = 3
    """Keep the newest N round checkpoints."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", f"must be >= 0, got {self.every}")
        _require(self.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig:
    wandb: bool = True
    """Log to Weights & Biases (rank 0 only)."""
    wandb_mode: str = "offline"
    """'offline' (default, no network or key needed), 'online' or 'disabled'. WANDB_MODE wins."""
    wandb_project: str = "fedrun"
    progress: bool = True
    """tqdm progress bar over rounds on rank 0."""

    def __post_init__(self) -> None:
        _require(self.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode",
                 f"must be 'offline', 'online' or 'disabled', got '{self.wandb_mode}'")


@dataclass
class FaultsConfig:
    """Simulated faults of a real federation. Rounds are counted from 1, as in metrics.jsonl."""

    dropout: float = 0.0
    """Probability that a sampled client drops out of a round: it does not train and sends
    nothing; the survivors are averaged with their weights renormalised. Drawn per
    (seed, round, client), so every rank agrees without communicating."""
    dropout_schedule: List[List[int]] = field(default_factory=list)
    """Deterministic dropouts on top of ``dropout``: [round, client] pairs."""
    nonfinite_schedule: List[List[int]] = field(default_factory=list)
    """[round, client] pairs whose local model is replaced by NaN after training: a corrupt update
    that the server's non-finite guard must reject (for testing that guard)."""
    max_rejected_rounds: int = 3
    """Stop the run with an error (naming the rounds and the rejection reasons) once every client
    update has been rejected (non-finite, out of the exact grid's range, refused by a transform)
    in this many consecutive rounds: the model cannot learn. 0 = never stop."""

    def __post_init__(self) -> None:
        _require(0.0 <= self.dropout <= 1.0, "faults.dropout", f"must be in [0, 1], got {self.dropout}")
        for key in ("dropout_schedule", "nonfinite_schedule"):
            for pair in getattr(self, key):
                _require(len(pair) == 2 and pair[0] >= 1 and pair[1] >= 0, f"faults.{key}",
                         f"needs [round >= 1, client >= 0] pairs, got {list(pair)}")
        _require(self.max_rejected_rounds >= 0, "faults.max_rejected_rounds",
                 f"must be >= 0, got {self.max_rejected_rounds}")


@dataclass
class EvalConfig:
    """FID/KID of samples from the EMA model (``fedrun.eval.features``), during training and in
    ``fedrun evaluate``; always reported with the real-vs-real floor and the sample count."""

    every: int = 0
    """Evaluate during training every this many rounds and after the last (0 = never)."""
    at: List[int] = field(default_factory=list)
    """Also evaluate after these rounds (e.g. the budgets a comparison reads; with ``every``
    0, only after these). A round past the run's last is never reached."""
    num_samples: int = 1000
    """Generated samples per evaluation (fewer than 1000: biased FID, a warning says so)."""
    feature: str = "digits"
    """A registered feature extractor (``fedrun.registry.FEATURE_EXTRACTORS``): 'digits' (the
    shipped digits classifier, offline) or 'inception' (torchmetrics' FID InceptionV3)."""
    inception_weights: Optional[str] = None
    """Local path of weights-inception-2015-12-05-6726825d.pth for 'inception' without internet."""
    scheduler: str = "ddim"
    """Sampler: 'ddim' (fast) or 'ddpm' (all num_train_timesteps steps)."""
    steps: int = 50
    """DDIM inference steps."""
    seed: int = 4321
    """Noise seed of the evaluation samples (the same at every evaluation) and of the floor subset."""
    kid_subset_size: int = 100
    """KID subset size (capped by the number of reference and generated images)."""
    tstr: bool = False
    """Also score train-on-synthetic, test-on-real (``fedrun.eval.tstr``): a small classifier
    trained on the samples (labelled by the digits classifier, or a conditional task's labels),
    tested on the held-out images: ``tstr_accuracy``, beside ``trtr_accuracy`` (the same
    classifier trained on as many real images) and ``tstr_chance``. Needs labelled held-out
    images; costs a few seconds per evaluation on a CPU core."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        _require(all(isinstance(r, int) and r >= 1 for r in self.at), "eval.at",
                 f"must be a list of rounds >= 1, got {list(self.at)}")
        _require(self.num_samples >= 2, "eval.num_samples", f"must be >= 2, got {self.num_samples}")
        _require(self.scheduler in ("ddim", "ddpm"), "eval.scheduler",
                 f"must be 'ddim' or 'ddpm', got '{self.scheduler}'")
        _require(self.steps >= 1, "eval.steps", f"must be >= 1, got {self.steps}")
        _require(self.kid_subset_size >= 2, "eval.kid_subset_size",
                 f"must be >= 2, got {self.kid_subset_size}")


@dataclass
class CentralConfig:
    """``fedrun central``: the data-parallel baseline on the union of the clients' data, with the
    same model, optimizer, learning rate and batch as a client."""

    samples: Optional[int] = None
    """Budget in samples seen; null = the federated budget of this config: rounds x K x E x B."""
    batch_size: Optional[int] = None
    """Global batch of one optimizer step, split evenly over the ranks; null = optim.batch_size."""
    steps_per_round: Optional[int] = None
    """Optimizer steps per 'round', the unit of EMA updates, logging and *.every cadences;
    null = K x E, so that a central round sees as many samples as a federated round."""
    micro_batch: Optional[int] = None
    """Images per forward/backward pass (gradients accumulated over a rank's slice); null = the
    whole slice. With micro_batch = batch / W_max, 1..W_max ranks give bit-identical gradients
    for power-of-two world sizes (same shapes, exact halving), not only equal up to rounding."""

    def __post_init__(self) -> None:
        _require(self.samples is None or self.samples >= 1, "central.samples",
                 f"must be >= 1 or null, got {self.samples}")
        _require(self.batch_size is None or self.batch_size >= 1, "central.batch_size",
                 f"must be >= 1 or null, got {self.batch_size}")
        _require(self.steps_per_round is None or self.steps_per_round >= 1, "central.steps_per_round",
                 f"must be >= 1 or null, got {self.steps_per_round}")
        _require(self.micro_batch is None or self.micro_batch >= 1, "central.micro_batch",
                 f"must be >= 1 or null, got {self.micro_batch}")


@dataclass
class PrivacyConfig:
    """Client-level differential privacy, DP-FedAvg (McMahan et al. 2018; ``fedrun.fl.privacy``):
    each client's whole update is clipped to L2 norm ``clip_norm`` (update transform 'dp_clip'),
    Gaussian noise N(0, (noise_multiplier * clip_norm)^2) is added once to the round's sum
    (server transform 'dp_noise', seeded by (seed, round): the same on every rank), the sum is
    divided by the expected cohort size, and dp-accounting's RDP (or PLD) accountant reports
    epsilon. Optionally the clip norm adapts to a quantile of the update norms (Andrew et al.
    2021). A DP run prints a pre-flight check of noise against the weights before round 1."""

    enabled: bool = False
    """Turn DP-FedAvg on: 'dp_clip' and 'dp_noise' are appended to aggregation.update_transforms /
    aggregation.server_transforms when absent. Needs server.weighting=uniform."""
    clip_norm: float = 1.0
    """C: the L2 norm bound of one client's update (local - global, the whole federated vector)."""
    noise_multiplier: Optional[float] = None
    """sigma: noise std on the sum is sigma * clip_norm. Give it (epsilon is reported) or
    target_epsilon (sigma is calibrated before round 1), not both. 0 is the clip-only control:
    everything DP-FedAvg does (Poisson cohorts, clipping, the fixed denominator, adaptive
    clipping's count, exact) but no noise; epsilon is infinite."""
    target_epsilon: Optional[float] = None
    """Calibrate sigma so that epsilon after ``rounds`` rounds is at most this (at ``delta``)."""
    delta: float = 1e-5
    """delta of the (epsilon, delta) guarantee; below 1 / num_clients to mean anything."""
    sampling: str = "poisson"
    """How cohorts are drawn, as the accountant assumes: 'poisson' (each client independently
    with rate q = clients_per_round / num_clients; a round may have no client and then releases
    only noise) or 'fixed' (exactly clients_per_round without replacement, accounted as sampling
    without replacement under replace-one adjacency)."""
    max_noise_multiplier: float = 20.0
    """A target_epsilon that needs a larger sigma than this within ``rounds`` is refused."""
    accountant: str = "rdp"
    """Which dp_accounting accountant reports epsilon (every record's 'epsilon') and calibrates
    target_epsilon: 'rdp' (RdpAccountant) or 'pld' (PLDAccountant, privacy loss distributions:
    tighter; Poisson sampling only). final/privacy.json holds both where both apply."""
    clip_quantile: Optional[float] = None
    """Adaptive clipping (Andrew et al. 2021): the target quantile gamma of the clients' update
    norms that the clip norm tracks (e.g. 0.5: half the clients unclipped); clip_norm is then
    the initial clip. null = a fixed clip_norm."""
    clip_lr: float = 0.2
    """eta_C of adaptive clipping: C <- C * exp(-eta_C * (b - gamma)) after each round, b the
    noised fraction of unclipped clients."""
    count_noise_std: Optional[float] = None
    """sigma_b of adaptive clipping: std of the Gaussian noise on the count of unclipped clients
    (null = 0.05 * clients_per_round). noise_multiplier (or the calibrated sigma) stays the
    total that is accounted; the update's noise multiplier is raised to
    (sigma^-2 - (2 sigma_b)^-2)^-1/2, so 2 * sigma_b must exceed sigma."""

    def __post_init__(self) -> None:
        _require(self.clip_norm > 0, "privacy.clip_norm", f"must be > 0, got {self.clip_norm}")
        _require(self.noise_multiplier is None or self.noise_multiplier >= 0,
                 "privacy.noise_multiplier", f"must be >= 0 (0: the clip-only control) or null, "
                 f"got {self.noise_multiplier}")
        _require(self.target_epsilon is None or self.target_epsilon > 0, "privacy.target_epsilon",
                 f"must be > 0 or null, got {self.target_epsilon}")
        _require(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), got {self.delta}")
        _require(self.sampling in ("poisson", "fixed"), "privacy.sampling",
                 f"must be 'poisson' or 'fixed', got '{self.sampling}'")
        _require(self.max_noise_multiplier > 0, "privacy.max_noise_multiplier",
                 f"must be > 0, got {self.max_noise_multiplier}")
        _require(self.accountant in ("rdp", "pld"), "privacy.accountant",
                 f"must be 'rdp' or 'pld', got '{self.accountant}'")
        _require(not (self.accountant == "pld" and self.sampling == "fixed"), "privacy.accountant",
                 "'pld' accounts Poisson cohorts only: dp_accounting's PLDAccountant refuses the "
                 "replace-one adjacency that privacy.sampling=fixed is analysed under; use "
                 "privacy.accountant=rdp or privacy.sampling=poisson")
        _require(self.clip_quantile is None or 0 < self.clip_quantile < 1, "privacy.clip_quantile",
                 f"must be in (0, 1) or null, got {self.clip_quantile}")
        _require(self.clip_lr > 0, "privacy.clip_lr", f"must be > 0, got {self.clip_lr}")
        _require(self.count_noise_std is None or self.count_noise_std > 0, "privacy.count_noise_std",
                 f"must be > 0 or null, got {self.count_noise_std}")
        if self.enabled:
            _require((self.noise_multiplier is None) != (self.target_epsilon is None),
                     "privacy.noise_multiplier",
                     "with privacy.enabled, set exactly one of privacy.noise_multiplier and "
                     f"privacy.target_epsilon (got {self.noise_multiplier} and {self.target_epsilon})")


@dataclass
class TaskConfig:
    """What is trained: a registered task (``fedrun.registry.TASKS``, one folder of
    ``fedrun/tasks/``)."""

    name: str = "ddpm"
    """'ddpm' (unconditional DDPM pre-training; sections ``model``, ``diffusion``), 'sd_lora'
    (LoRA fine-tuning of a Stable Diffusion pipeline, ``fedrun finetune``; section ``finetune``),
    'dit' (class-conditional DiT; sections ``dit``, ``diffusion``), or a task of your own. Unset,
    a config that sets ``finetune.pretrained`` (written before tasks were named) is 'sd_lora'."""


@dataclass
class Config:
    """One federated (or centralized) diffusion training run: the core sections; the task's
    sections are added by ``load_config`` for the task the config names."""

    seed: int = 0
    output_dir: str = "runs/default"
    resume: str = "never"
    """'never' (refuse an existing run), 'auto' (continue from the latest checkpoint of
    output_dir) or the path of a checkpoint folder."""
    overwrite: bool = False
    """Delete an existing run in output_dir and start again."""
    device: str = "auto"
    """'auto' (cuda:(LOCAL_RANK mod GPUs) when CUDA is available: NCCL when every rank owns its
    GPU, gloo when ranks share one; else CPU with gloo), 'cpu', 'cuda'."""
    dist_timeout_s: int = 1800
    """Timeout of the process group's collectives, in seconds."""
    threads: Optional[int] = None
    """CPU threads per rank. null = 1 on CPU ranks (a CPU kernel's reductions depend on its
    thread count, so equal threads per rank is what keeps 1, 2, 3 ... processes bit-identical;
    one thread per rank also avoids oversubscribing the cores), and this rank's share of the
    cores on GPU ranks (their CPU threads do not enter the results). Set N for N threads per
    rank: runs are then bit-identical to other runs with N threads per rank."""
    precision: str = "fp32"
    """Compute precision of local training and of the centralized baseline: 'fp32', 'bf16'
    (autocast; also on CPU) or 'fp16' (autocast + gradient scaler; GPU only). The federated
    vector, the server step, the EMA and the optimizer state stay fp32."""
    plugins: List[str] = field(default_factory=list)
    """Modules to import before the config is validated: your own pieces (strategies, client
    algorithms, transforms, partitioners, data sources, tasks) registering themselves with
    ``fedrun.registry`` (installed plugins in the ``fedrun.plugins`` entry-point group load
    without being listed)."""

    num_clients: int = 4
    """C: the number of (virtual) clients; may exceed the number of ranks."""
    clients_per_round: Optional[int] = None
    """K: clients sampled each round (null = all)."""
    local_steps: int = 2
    """E: local optimizer steps of each sampled client per round."""
    local_epochs: Optional[float] = None
    """Alternative to local_steps: passes over the client's data per round (overrides E)."""
    rounds: int = 10
    """T: global rounds."""

    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    central: CentralConfig = field(default_factory=CentralConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _require(bool(self.output_dir), "output_dir", "must not be empty")
        _require(self.device in ("auto", "cpu", "cuda"), "device",
                 f"must be 'auto', 'cpu' or 'cuda', got '{self.device}'")
        _require(self.precision in ("fp32", "bf16", "fp16"), "precision",
                 f"must be 'fp32', 'bf16' or 'fp16', got '{self.precision}'")
        _require(self.threads is None or self.threads >= 1, "threads",
                 f"must be >= 1 or null, got {self.threads}")
        _require(self.dist_timeout_s >= 1, "dist_timeout_s", f"must be >= 1, got {self.dist_timeout_s}")
        _require(self.num_clients >= 1, "num_clients", f"must be >= 1, got {self.num_clients}")
        if self.clients_per_round is not None:
            _require(1 <= self.clients_per_round <= self.num_clients, "clients_per_round",
                     f"must be between 1 and num_clients={self.num_clients}, got {self.clients_per_round}")
        _require(self.local_steps >= 1, "local_steps", f"must be >= 1, got {self.local_steps}")
        _require(self.local_epochs is None or self.local_epochs > 0, "local_epochs",
                 f"must be > 0 or null, got {self.local_epochs}")
        _require(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        if self.server.weighting is None:  # resolved here, so config.yaml shows what runs
            self.server.weighting = "uniform" if self.privacy.enabled else "samples"
        self._check_privacy()
        for key in ("dropout_schedule", "nonfinite_schedule"):
            for _, client in getattr(self.faults, key):
                _require(client < self.num_clients, f"faults.{key}",
                         f"client {client} does not exist (num_clients={self.num_clients})")

    def _check_privacy(self) -> None:
        """DP-FedAvg's requirements; with privacy.enabled its transforms are inserted here, so the
        resolved config (config.yaml) lists what runs."""
        p, agg = self.privacy, self.aggregation
        if not p.enabled:
            for key, names, name in (("update_transforms", agg.update_transforms, "dp_clip"),
                                     ("server_transforms", agg.server_transforms, "dp_noise")):
                _require(name not in names, f"aggregation.{key}",
                         f"'{name}' is part of DP-FedAvg: set privacy.enabled=true to use it")
            return
        _require(self.server.weighting == "uniform", "server.weighting",
                 f"'{self.server.weighting}' weights a client by its data size, which scales its "
                 "clipped update past privacy.clip_norm; client-level DP (privacy.enabled) needs "
                 "server.weighting=uniform")
        if "dp_clip" not in agg.update_transforms:
            agg.update_transforms = [*agg.update_transforms, "dp_clip"]
        if "dp_noise" not in agg.server_transforms:
            agg.server_transforms = [*agg.server_transforms, "dp_noise"]
        _require(agg.update_transforms[-1] == "dp_clip", "aggregation.update_transforms",
                 "'dp_clip' must come last: a transform after it could undo the norm bound, got "
                 f"{list(agg.update_transforms)}")
        _require(p.delta < 1.0 / self.num_clients,
                 "privacy.delta", f"{p.delta} is not below 1 / num_clients = "
                 f"{1.0 / self.num_clients:.3g}: such a guarantee allows publishing a client's data")

    @property
    def cohort_size(self) -> int:
        return self.clients_per_round or self.num_clients


# Keys that do not change the trajectory of a run: a resumed run may change them freely.
# `rounds` is among them so that a finished run can be extended.
_DIGEST_EXEMPT = {"output_dir", "resume", "overwrite", "device", "dist_timeout_s", "threads", "rounds",
                  "sample", "checkpoint", "logging", "eval", "faults.max_rejected_rounds"}


#: The sections whose named piece brings parameters of its own: section -> (the key naming the
#: piece, its registry). The piece's ``Params`` fields become keys of the section.
PIECE_SECTIONS: Dict[str, Tuple[str, Registry]] = {
    "data": ("name", DATASETS),
    "partition": ("method", PARTITIONERS),
    "server": ("strategy", STRATEGIES),
    "client": ("algorithm", CLIENT_ALGORITHMS),
}
#: The sections holding lists of pieces; a listed piece with parameters gets a sub-section of
#: its name (``aggregation.<transform>.<parameter>``).
PIECE_LISTS: Dict[str, Tuple[Tuple[str, Registry], ...]] = {
    "aggregation": (("update_transforms", UPDATE_TRANSFORMS),
                    ("server_transforms", SERVER_TRANSFORMS)),
}

#: Piece sections inside a core section, (section, sub-section) -> (the key naming the piece,
#: its registry): ``aggregation.uplink.name: qsgd`` + ``aggregation.uplink.bits: 4``. A plain
#: name is short for the sub-section (``aggregation.uplink=bf16``).
NESTED_PIECES: Dict[Tuple[str, str], Tuple[str, Registry]] = {
    ("aggregation", "uplink"): ("name", CODECS),
    ("aggregation", "downlink"): ("name", CODECS),
}

#: Keys that were fixed parts of the piece sections before pieces had parameters of their own,
#: with their defaults of that time (fedrun 9dcece4), and the task sections of that time with
#: theirs. A config written then (a run directory's config.yaml lists every key) keeps loading:
#: such a key that the named piece (or task) does not take is dropped while it holds its old
#: default, and refused, naming what takes it, otherwise.
LEGACY_KEYS: Dict[str, Dict[str, Any]] = {
    "data": {"root": None, "grayscale": False, "center_crop": True, "labels_csv": None,
             "label_column": None, "filename_column": "image_id", "skip_corrupt": False},
    "partition": {"alpha": 0.5, "shards_per_client": 2, "unbalanced_sigma": 1.0},
    "server": {"momentum": 0.9, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "client": {"prox_mu": 0.01},
}
LEGACY_SECTIONS: Dict[str, Dict[str, Any]] = {
    "model": {"pretrained": None, "block_out_channels": [32, 64], "layers_per_block": 1,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8,
              "attention_head_dim": 8},
    "diffusion": {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                  "beta_schedule": "linear", "prediction_type": "epsilon"},
    "finetune": {"pretrained": None, "mode": "lora", "lora_rank": 8, "lora_alpha": None,
                 "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                 "lora_aggregation": "fedavg", "aggregation_error_every": 1,
                 "instance_prompt": None, "prompts_file": None, "class_prompt": None,
                 "class_data_dir": None, "class_prompts_file": None, "prior_loss_weight": 1.0,
                 "prompt_dropout": 0.0, "validation_prompts": [], "guidance_scale": 7.5,
                 "base_dtype": "float32"},
}
#: Which task took a legacy section (for messages).
LEGACY_SECTION_TASKS = {"model": "ddpm", "diffusion": "ddpm", "finetune": "sd_lora"}


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None, *,
                task: Optional[str] = None) -> Any:
    """Merge defaults <- YAML file <- ``key=value`` overrides, validate, return the dataclass.

    ``task``: the task a command trains (``fedrun finetune``: 'sd_lora'); a config naming
    another is refused. Otherwise ``task.name`` decides (default 'ddpm'). The modules under
    ``plugins`` are imported first, so their pieces can be named."""
    raw = _read(path, overrides)
    load_plugins(raw.get("plugins") or [])
    task_cls = TASKS.get(_task_name(raw, task), "task.name")
    raw.setdefault("task", {})["name"] = task_cls.name
    _drop_legacy(raw, task_cls)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(config_schema(task_cls, raw)), raw)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    _check_pieces(cfg, task_cls)
    return cfg


def _read(path: Optional[str], overrides: Optional[List[str]]) -> dict:
    """The YAML file and the overrides merged, as plain containers (validated later)."""
    layers = []
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            layers.append(OmegaConf.load(file))
        except Exception as exc:  # yaml syntax errors come in many classes
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            layers.append(OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override '{item}': {_first_line(exc)}") from None
        except yaml.YAMLError as exc:  # the value is read as YAML: '*x' is an alias there
            raise ConfigError(f"override '{item}': its value is not valid YAML ({_first_line(exc)}); "
                              "quote a value holding '*', '&', ':' or '#', e.g. "
                              "aggregation.shared=['*lora_A*']") from None
    try:
        merged = OmegaConf.to_container(OmegaConf.merge(*layers)) if layers else {}
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None
    if not isinstance(merged, dict):
        raise ConfigError(f"config file '{path}' does not hold a mapping of keys")
    for section in (*PIECE_SECTIONS, *PIECE_LISTS, "task"):
        if merged.get(section) is not None and not isinstance(merged[section], dict):
            raise ConfigError(f"config key '{section}': must be a section of keys, got "
                              f"{merged[section]!r}")
    shared = (merged.get("aggregation") or {}).get("shared")
    if isinstance(shared, str):  # aggregation.shared=udec
        merged["aggregation"]["shared"] = [shared]
    for section, sub in NESTED_PIECES:
        value = (merged.get(section) or {}).get(sub)
        if isinstance(value, str):
            merged[section][sub] = {NESTED_PIECES[section, sub][0]: value}
        elif value is not None and not isinstance(value, dict):
            raise ConfigError(f"config key '{section}.{sub}': must be a name or a section of "
                              f"keys, got {value!r}")
    return merged


def _task_name(raw: dict, required: Optional[str]) -> str:
    named = (raw.get("task") or {}).get("name")
    if required is not None:
        if named is not None and named != required:
            raise ConfigError(f"config key 'task.name': this command trains task '{required}', "
                              f"the config names '{named}' (use `fedrun train` for it)")
        return required
    if named is not None:
        return str(named)
    # configs written before tasks were named: a fine-tuning config sets finetune.pretrained
    return "sd_lora" if (raw.get("finetune") or {}).get("pretrained") else "ddpm"


def _selected(raw: dict, section: str, key: str, base: type) -> Any:
    value = (raw.get(section) or {}).get(key)
    return value if value is not None else _defaults(base)[key]


def _defaults(cls: type) -> Dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _core_types() -> Dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _drop_legacy(raw: dict, task_cls: type) -> None:
    """Old keys that the named pieces and task do not take: dropped at their old defaults,
    refused with what takes them otherwise."""
    types = _core_types()
    for section, (key, registry) in PIECE_SECTIONS.items():
        values = raw.get(section)
        if not values:
            continue
        name = _selected(raw, section, key, types[section])
        registry.check(name, f"{section}.{key}")
        taken = _taken(types[section], registry.params_of(name))
        for item in [k for k in values if k not in taken]:
            if item in LEGACY_KEYS.get(section, {}) and values[item] == LEGACY_KEYS[section][item]:
                del values[item]
                continue
            raise _not_a_parameter(section, item, registry, name, taken - {key})
    for (section, sub), (key, registry) in NESTED_PIECES.items():
        values = (raw.get(section) or {}).get(sub)
        if not values:
            continue
        name = _nested_name(raw, section, sub)
        registry.check(name, f"{section}.{sub}.{key}")
        taken = _taken(_nested_type(section, sub), registry.params_of(name))
        for item in [k for k in values if k not in taken]:
            raise _not_a_parameter(f"{section}.{sub}", item, registry, name, taken - {key})
    for section in [k for k in raw if k not in types and k not in task_cls.config_sections
                    and k not in LEGACY_SECTIONS]:
        owners = [name for name in TASKS.names()
                  if section in getattr(TASKS.get(name), "config_sections", {})]
        if owners:  # another task's section (only looked up on this error path)
            raise ConfigError(f"config section '{section}' belongs to task "
                              f"{' / '.join(repr(o) for o in owners)}, and this config trains task "
                              f"'{task_cls.name}': set task.name={owners[0]}, or remove the section")
    for section, legacy in LEGACY_SECTIONS.items():
        if section in raw and section not in task_cls.config_sections:
            values = raw[section] or {}
            if all(k in legacy and v == legacy[k] for k, v in values.items()):
                del raw[section]
                continue
            owner = LEGACY_SECTION_TASKS[section]
            raise ConfigError(f"config section '{section}' belongs to task '{owner}', and this "
                              f"config trains task '{task_cls.name}': set task.name={owner}"
                              + (" (or use `fedrun finetune`)" if owner == "sd_lora" else "")
                              + ", or remove the section")


def _taken(base: type, params: Optional[type]) -> set:
    """The keys of a piece section: its own fields and the named piece's parameters."""
    return ({f.name for f in dataclasses.fields(base)}
            | ({f.name for f in dataclasses.fields(params)} if params else set()))


def _not_a_parameter(where: str, item: str, registry: Registry, name: str, takes: set) -> ConfigError:
    """The error for key ``where.item``, which the named piece does not take."""
    takers = registry.taking(item)
    return ConfigError(
        f"config key '{where}.{item}': not a parameter of {registry.kind} '{name}' "
        + (f"(it belongs to {', '.join(repr(t) for t in takers)}); " if takers else "; ")
        + f"'{name}' takes: {', '.join(sorted(takes)) or 'nothing else'}")


def _nested_type(section: str, sub: str) -> type:
    return typing.get_type_hints(_core_types()[section])[sub]


def _nested_name(raw: dict, section: str, sub: str) -> str:
    key = NESTED_PIECES[section, sub][0]
    value = ((raw.get(section) or {}).get(sub) or {}).get(key)
    return value if value is not None else _defaults(_nested_type(section, sub))[key]


def config_schema(task_cls: type, raw: dict) -> type:
    """The Config dataclass of ``raw``: the core sections, each piece section extended with the
    named piece's parameters, and the task's sections."""
    types = _core_types()
    fields = []
    for section, (key, registry) in PIECE_SECTIONS.items():
        name = _selected(raw, section, key, types[section])
        registry.check(name, f"{section}.{key}")
        params = registry.params_of(name)
        if params is not None:
            fields.append(_section_field(section, _extended(types[section], params,
                                                           f"{registry.kind} '{name}'")))
    nested: Dict[str, list] = {}
    for section, lists in PIECE_LISTS.items():
        for key, registry in lists:
            names = _selected(raw, section, key, types[section]) or []
            for i, name in enumerate(names):
                registry.check(name, f"{section}.{key}[{i}]")
                params = registry.params_of(name)
                if params is not None:  # validated by _check_pieces, naming the key
                    nested.setdefault(section, []).append(_section_field(name, _fields_only(params)))
    for (section, sub), (key, registry) in NESTED_PIECES.items():
        name = _nested_name(raw, section, sub)
        registry.check(name, f"{section}.{sub}.{key}")
        params = registry.params_of(name)
        if params is not None:
            nested.setdefault(section, []).append(_section_field(sub, _extended(
                _nested_type(section, sub), params, f"{registry.kind} '{name}'")))
    for section, extra in nested.items():
        fields.append(_section_field(section, dataclasses.make_dataclass(
            types[section].__name__, extra, bases=(types[section],))))
    for section, cls in task_cls.config_sections.items():
        if section in types:
            raise TypeError(f"task '{task_cls.name}': its section '{section}' is a core section")
        fields.append(_section_field(section, cls))
    return dataclasses.make_dataclass("Config", fields, bases=(Config,))


def _section_field(name: str, cls: type) -> tuple:
    return (name, cls, field(default_factory=cls))


def _extended(base: type, params: type, owner: str) -> type:
    """``base`` with the fields of ``params`` added (their types resolved in their module)."""
    hints = typing.get_type_hints(params)
    clash = {f.name for f in dataclasses.fields(base)} & {f.name for f in dataclasses.fields(params)}
    if clash:
        raise TypeError(f"{owner}: parameters {sorted(clash)} clash with the section's own keys")
    extra = []
    for f in dataclasses.fields(params):
        if f.default is not dataclasses.MISSING:
            spec = field(default=f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            spec = field(default_factory=f.default_factory)  # type: ignore[misc]
        else:
            spec = field(default=MISSING)
        extra.append((f.name, hints[f.name], spec))
    return dataclasses.make_dataclass(base.__name__, extra, bases=(base,))


def _fields_only(params: type) -> type:
    """``params``'s fields (types resolved, defaults kept) without its methods: OmegaConf builds
    the section, and ``_check_pieces`` then validates it through the real dataclass."""
    return _extended(dataclasses.make_dataclass(params.__name__, []), params, params.__name__)


def _check_pieces(cfg: Any, task_cls: type) -> None:
    """The named pieces' parameters (their ``Params.__post_init__``) and whole-config checks."""
    for section, (key, registry) in PIECE_SECTIONS.items():
        values = getattr(cfg, section)
        name = getattr(values, key)
        _build_params(registry, name, values, section)
        check = getattr(registry.get(name), "check_config", None)
        if callable(check):
            check(cfg)
    for section, lists in PIECE_LISTS.items():
        values = getattr(cfg, section)
        for key, registry in lists:
            for name in getattr(values, key):
                if registry.params_of(name) is not None:
                    _build_params(registry, name, getattr(values, name), f"{section}.{name}")
    for (section, sub), (key, registry) in NESTED_PIECES.items():
        values = getattr(getattr(cfg, section), sub)
        name = getattr(values, key)
        _build_params(registry, name, values, f"{section}.{sub}")
        if getattr(values, "error_feedback", False) and getattr(registry.get(name), "lossless", False):
            raise ConfigError(f"config key '{section}.{sub}.error_feedback': {registry.kind} "
                              f"'{name}' is lossless, so there is nothing to feed back")
    FEATURE_EXTRACTORS.check(cfg.eval.feature)
    task_cls.check_config(cfg)
    _check_vectorize(cfg, task_cls)


def _check_vectorize(cfg: Any, task_cls: type) -> None:
    """What vectorized clients (client.vectorize > 0) cannot run, refused by name."""
    if not cfg.client.vectorize:
        return
    key = "config key 'client.vectorize'"
    if not getattr(task_cls, "supports_vectorized_clients", False):
        raise ConfigError(f"{key}: task '{task_cls.name}' does not split its loss into a step's "
                          "drawn inputs and the loss of them (Task.draw_step / step_loss), which "
                          "vectorized clients need; set client.vectorize=0")
    algorithm = CLIENT_ALGORITHMS.get(cfg.client.algorithm)
    if not getattr(algorithm, "vectorizable", False):
        able = sorted(name for name in CLIENT_ALGORITHMS.names()
                      if getattr(CLIENT_ALGORITHMS.get(name), "vectorizable", False))
        raise ConfigError(f"{key}: client algorithm '{cfg.client.algorithm}' runs local steps of "
                          "its own (not the optimizer's steps plus a gradient term), which "
                          f"vectorized clients do not run; use client.algorithm={'|'.join(able)}, "
                          "or client.vectorize=0")
    if cfg.client.stateful_optimizer and cfg.optim.name == "sgd" and cfg.optim.momentum > 0:
        raise ConfigError(f"{key}: stateful vectorized clients continue AdamW, or plain SGD, "
                          f"not SGD with momentum (optim.momentum={cfg.optim.momentum}); set "
                          "optim.momentum=0, optim.name=adamw, or client.vectorize=0")
    if cfg.precision != "fp32":
        raise ConfigError(f"{key}: vectorized clients train in fp32 only, got "
                          f"precision={cfg.precision}; set precision=fp32, or client.vectorize=0")


def _build_params(registry: Registry, name: str, values: Any, where: str) -> Any:
    try:
        return registry.build_params(name, values)
    except ParamError as exc:
        raise ConfigError(f"config key '{where}.{exc.field}': {exc}") from None


def make_section(section: str, **values: Any) -> Any:
    """One piece section built in code, with the named piece's parameters and the same
    validation as in a config: ``make_section("partition", method="dirichlet", alpha=0.3)``,
    ``make_section("data", name="image_folder", root="photos")``."""
    load_plugins()
    key, registry = PIECE_SECTIONS[section]
    base = _core_types()[section]
    name = values.get(key, _defaults(base)[key])
    registry.check(name, f"{section}.{key}")
    params = registry.params_of(name)
    schema = _extended(base, params, f"{registry.kind} '{name}'") if params is not None else base
    try:
        built = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{section}: {_describe(exc)}") from None
    _build_params(registry, name, built, section)
    return built


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = _first_line(exc)
    if "Key '" in message and "not in" in message:
        return f"unknown config key '{key}' ({message})"
    return f"config key '{key}': {message}" if key else message


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def digest_view(cfg: Any) -> dict:
    """The part of the config that determines the trajectory (compared on resume)."""
    view = {k: v for k, v in to_dict(cfg).items() if k not in _DIGEST_EXEMPT}
    for dotted in (key for key in _DIGEST_EXEMPT if "." in key):
        section, name = dotted.split(".", 1)
        view.get(section, {}).pop(name, None)
    return view


def digest(cfg: Any) -> str:
    blob = json.dumps(digest_view(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _differences(old: dict, new: dict, prefix: str = "") -> List[Tuple[str, Any, Any]]:
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, MISSING), new.get(key, MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_differences(a, b, prefix=f"{name}."))
        elif a != b:
            out.append((name, a, b))
    return out


def diff_keys(old: dict, new: dict, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested dicts, as 'key: old -> new'."""
    return [f"{name}: {a!r} -> {b!r}" for name, a, b in _differences(old, new, prefix)]


def resume_differences(saved_view: dict, cfg: Any) -> Tuple[List[str], List[str]]:
    """A checkpoint's config view (``digest_view`` when it was written) against ``cfg``'s:
    (the differing keys as 'key: old -> new', the keys the checkpoint predates). A key absent
    from the saved view whose value in ``cfg`` is its default is an option added to fedrun
    after the checkpoint was written and left off (every option's default keeps the earlier
    behaviour): not a difference, so a fedrun upgrade does not strand a run. The same key set
    to anything else is one."""
    defaults = json.loads(json.dumps(digest_view(OmegaConf.to_object(OmegaConf.structured(type(cfg)))),
                                     default=str))
    current = json.loads(json.dumps(digest_view(cfg), default=str))
    changed, added = [], []
    for name, a, b in _differences(saved_view, current):
        default = defaults
        for part in name.split("."):
            default = default.get(part, MISSING) if isinstance(default, dict) else MISSING
        if a is MISSING and b == default:
            added.append(name)
        else:
            changed.append(f"{name}: {'(not in the checkpoint)' if a is MISSING else repr(a)} -> {b!r}")
    return changed, added
