"""Typed configuration: OmegaConf structured dataclasses, YAML files and ``key=value`` overrides.

Loaded once at the entry point (``load_config``); everything below receives plain dataclasses.
Each section validates itself in ``__post_init__`` (called by ``OmegaConf.to_object``), so an
impossible value is reported with the full key name before any process group or model exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedrun.errors import ConfigError


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    name: str = "digits"
    """'digits' (scikit-learn's bundled 8x8 digits, embedded), 'image_folder' or 'celeba'."""
    root: Optional[str] = None
    """Folder of images (searched recursively) for image_folder / celeba."""
    image_size: int = 16
    """Side of the square training images, in pixels."""
    grayscale: bool = False
    """Image folders: convert to one channel (digits are always one channel)."""
    center_crop: bool = True
    """Image folders: crop the largest centred square before resizing (CelebA: 178x178)."""
    labels_csv: Optional[str] = None
    """Optional CSV (or CelebA's whitespace list_attr_celeba.txt) giving a label per file."""
    label_column: Optional[str] = None
    """Column of labels_csv used as the label (e.g. 'Smiling' for CelebA)."""
    filename_column: str = "image_id"
    """Column of labels_csv holding the file name (relative to root, or the base name)."""
    heldout_fraction: float = 0.1
    """Share of the images kept out of training, for evaluation (the FID/KID reference). The
    split is the same for every ``seed`` (``fedrun.data.datasets.HELDOUT_SPLIT_SEED``); the shipped
    digits classifier never saw a reference image of the digits at this default or below."""
    max_samples: Optional[int] = None
    """Use only a deterministic subset of this many images (quick runs): a fixed part of the
    reference split as held-out set and a seeded choice of the other images for training."""
    skip_corrupt: bool = False
    """Skip unreadable image files (listed in a warning) instead of stopping with an error."""

    def __post_init__(self) -> None:
        _require(self.name in ("digits", "image_folder", "celeba"), "data.name",
                 f"must be 'digits', 'image_folder' or 'celeba', got '{self.name}'")
        _require(self.image_size >= 4, "data.image_size", f"must be >= 4, got {self.image_size}")
        _require(0.0 <= self.heldout_fraction < 1.0, "data.heldout_fraction",
                 f"must be in [0, 1), got {self.heldout_fraction}")
        _require(self.max_samples is None or self.max_samples >= 1, "data.max_samples",
                 f"must be >= 1, got {self.max_samples}")
        if self.name != "digits":
            _require(bool(self.root), "data.root", f"is required when data.name='{self.name}'")
        if self.labels_csv is not None:
            _require(bool(self.label_column), "data.label_column", "is required with data.labels_csv")


@dataclass
class PartitionConfig:
    """How the training images are split among the clients."""

    method: str = "iid"
    """A registered partitioner (``fedrun.data.partition.PARTITIONERS``): 'iid', 'dirichlet'
    (label skew, alpha), 'shards' (k classes per client), 'unbalanced'."""
    alpha: float = 0.5
    """Dirichlet concentration: small = each client sees few classes, large = near iid."""
    shards_per_client: int = 2
    """'shards': label-sorted shards per client (about that many classes each)."""
    unbalanced_sigma: float = 1.0
    """'unbalanced': client sizes are log-normal with this sigma (0 = equal sizes)."""

    def __post_init__(self) -> None:
        from fedrun.data.partition import PARTITIONERS  # here: fedrun.data.partition imports this module

        PARTITIONERS.check(self.method)
        _require(self.alpha > 0, "partition.alpha", f"must be > 0, got {self.alpha}")
        _require(self.shards_per_client >= 1, "partition.shards_per_client",
                 f"must be >= 1, got {self.shards_per_client}")
        _require(self.unbalanced_sigma >= 0, "partition.unbalanced_sigma",
                 f"must be >= 0, got {self.unbalanced_sigma}")


@dataclass
class ModelConfig:
    """The diffusers UNet2DModel: built from these fields, or loaded from ``pretrained``."""

    pretrained: Optional[str] = None
    """Local folder or hub id of a UNet2DModel (or a DDPMPipeline folder with a 'unet/' subfolder)."""
    block_out_channels: List[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    down_block_types: List[str] = field(default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D"])
    up_block_types: List[str] = field(default_factory=lambda: ["AttnUpBlock2D", "UpBlock2D"])
    norm_num_groups: int = 8
    attention_head_dim: Optional[int] = 8

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        _require(n >= 1, "model.block_out_channels", "needs at least one entry")
        _require(len(self.down_block_types) == n, "model.down_block_types",
                 f"needs {n} entries (one per model.block_out_channels), got {len(self.down_block_types)}")
        _require(len(self.up_block_types) == n, "model.up_block_types",
                 f"needs {n} entries (one per model.block_out_channels), got {len(self.up_block_types)}")
        for c in self.block_out_channels:
            _require(c % self.norm_num_groups == 0, "model.block_out_channels",
                     f"{c} is not divisible by model.norm_num_groups={self.norm_num_groups}")


@dataclass
class DiffusionConfig:
    """DDPM noise schedule (paper: linear beta 1e-4 .. 0.02, T = 1000, epsilon prediction)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        _require(self.num_train_timesteps >= 2, "diffusion.num_train_timesteps",
                 f"must be >= 2, got {self.num_train_timesteps}")
        _require(0 < self.beta_start < self.beta_end < 1, "diffusion.beta_start",
                 f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        _require(self.prediction_type in ("epsilon", "v_prediction", "sample"),
                 "diffusion.prediction_type", f"unknown '{self.prediction_type}'")


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
    """A registered server strategy (``fedrun.server.STRATEGIES``): 'fedavg' (w += lr * mean
    update), 'fedavgm' (server momentum), or the adaptive optimizers of Reddi et al. (2021)
    'fedadam', 'fedyogi', 'fedadagrad'."""
    lr: Optional[float] = None
    """Server learning rate; null = the strategy's default: 1.0 for fedavg/fedavgm (1.0 is plain
    FedAvg, the average of the client models), 0.01 for the adaptive strategies."""
    momentum: float = 0.9
    """'fedavgm' only."""
    beta1: float = 0.9
    """Adaptive strategies: decay of the first moment of the mean update (0 = none)."""
    beta2: float = 0.99
    """'fedadam', 'fedyogi': decay of the second moment."""
    tau: float = 1e-3
    """Adaptive strategies: the adaptivity floor tau in lr * m / (sqrt(v) + tau); v starts at tau^2."""
    weighting: Optional[str] = None
    """Weight of a client in the average: 'samples' (its data size, as in FedAvg) or 'uniform';
    null = 'samples', or 'uniform' under privacy.enabled (client-level DP weighs every client 1)."""

    def __post_init__(self) -> None:
        from fedrun.server import STRATEGIES

        STRATEGIES.check(self.strategy, "server.strategy")
        _require(self.lr is None or self.lr > 0, "server.lr", f"must be > 0 or null, got {self.lr}")
        _require(0 <= self.momentum < 1, "server.momentum", f"must be in [0, 1), got {self.momentum}")
        _require(0 <= self.beta1 < 1, "server.beta1", f"must be in [0, 1), got {self.beta1}")
        _require(0 <= self.beta2 < 1, "server.beta2", f"must be in [0, 1), got {self.beta2}")
        _require(self.tau > 0, "server.tau", f"must be > 0, got {self.tau}")
        _require(self.weighting in (None, "samples", "uniform"), "server.weighting",
                 f"must be 'samples' or 'uniform', got '{self.weighting}'")


@dataclass
class ClientConfig:
    """What a sampled client does with the global weights for its local steps."""

    algorithm: str = "fedavg"
    """A registered client algorithm (``fedrun.client.CLIENT_ALGORITHMS``): 'fedavg' trains
    local_steps steps of the client optimizer (optim.*) from the global weights; 'fedprox' adds
    the proximal term prox_mu/2 ||w - w_global||^2 to the loss (Li et al. 2020); 'scaffold'
    corrects every step with control variates (Karimireddy et al. 2020, option II)."""
    prox_mu: float = 0.01
    """'fedprox' only: the proximal coefficient mu."""
    stateful_optimizer: bool = False
    """Keep each client's optimizer state (AdamW moments, SGD momentum) across its rounds, in the
    client state store; false = a fresh optimizer every round (FedAvg as published)."""

    def __post_init__(self) -> None:
        from fedrun.client import CLIENT_ALGORITHMS

        CLIENT_ALGORITHMS.check(self.algorithm, "client.algorithm")
        _require(self.prox_mu >= 0, "client.prox_mu", f"must be >= 0, got {self.prox_mu}")


@dataclass
class AggregationConfig:
    """How the clients' updates are transformed and summed (``fedrun.aggregate``)."""

    exact: bool = True
    """Sum the round's weighted updates exactly (fixed-point integers in a float64 buffer): the
    sum does not depend on which clients share a rank, so 1, 2, 3, ... processes give
    bit-identical models at any clients_per_round. false: plain fp32 sums, half the bytes of
    the all-reduce, equal across world sizes only up to rounding (which Adam amplifies)."""
    update_transforms: List[str] = field(default_factory=lambda: ["nonfinite_guard"])
    """Registered client-update transforms (``fedrun.aggregate.UPDATE_TRANSFORMS``) applied in
    order to each client's update (local - global) before the weighted sum; one may reject the
    update. 'nonfinite_guard' rejects updates (or losses) holding a NaN or an infinity."""
    rounding: str = "stochastic"
    """Exact mode: how a term is rounded to the fixed-point grid. 'stochastic' (unbiased: up with
    probability equal to the fraction of a grid step, from the (seed, round, client) stream, so
    the sum stays independent of the world size) or 'nearest' (deterministic, biased: a
    coordinate's update below half a grid step is lost every round)."""
    server_transforms: List[str] = field(default_factory=list)
    """Registered server transforms (``fedrun.aggregate.SERVER_TRANSFORMS``) applied in order
    to the reduced sum of updates before the server step."""

    def __post_init__(self) -> None:
        from fedrun.aggregate import SERVER_TRANSFORMS, UPDATE_TRANSFORMS

        _require(self.rounding in ("stochastic", "nearest"), "aggregation.rounding",
                 f"must be 'stochastic' or 'nearest', got '{self.rounding}'")
        for i, name in enumerate(self.update_transforms):
            UPDATE_TRANSFORMS.check(name, f"aggregation.update_transforms[{i}]")
        for i, name in enumerate(self.server_transforms):
            SERVER_TRANSFORMS.check(name, f"aggregation.server_transforms[{i}]")


@dataclass
class EMAConfig:
    """Server-side exponential moving average of the global weights (used for sampling/export)."""

    enabled: bool = True
    decay: float = 0.95
    """Per-round decay d; update r uses min(d, r / (r + 1)), the running mean of the rounds so far
    until it reaches d (after ceil(d / (1 - d)) rounds). The EMA's weights then have a mean age
    of d / (1 - d) rounds (``fedrun.server.EMA``)."""

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
    """FID/KID of samples from the EMA model (``fedrun.features``), during training and in
    ``fedrun evaluate``; always reported with the real-vs-real floor and the sample count."""

    every: int = 0
    """Evaluate during training every this many rounds and after the last (0 = never)."""
    num_samples: int = 1000
    """Generated samples per evaluation (fewer than 1000: biased FID, a warning says so)."""
    feature: str = "digits"
    """A registered feature extractor (``fedrun.features.FEATURE_EXTRACTORS``): 'digits' (the
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

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        _require(self.num_samples >= 2, "eval.num_samples", f"must be >= 2, got {self.num_samples}")
        from fedrun.features import FEATURE_EXTRACTORS  # here: fedrun.features imports torch

        FEATURE_EXTRACTORS.check(self.feature)
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
class FinetuneConfig:
    """``fedrun finetune``: a Stable Diffusion-style pipeline folder or hub id, LoRA on its U-Net.

    The images are ``data.root`` (``data.name: image_folder``, every image used); their prompts are
    ``instance_prompt`` and/or ``prompts_file``. The noise schedule is the pipeline's own
    ``scheduler/`` (the ``diffusion`` section is not used).
    """

    pretrained: Optional[str] = None
    """Hub id (e.g. runwayml/stable-diffusion-v1-5) or local folder with unet/, vae/,
    text_encoder/, tokenizer/, scheduler/."""
    mode: str = "lora"
    """'lora' (frozen base, train LoRA on the U-Net) or 'full' (train the whole U-Net,
    text-conditioned: the pre-training of the CPU demo); final/ is then a whole pipeline."""
    lora_rank: int = 8
    lora_alpha: Optional[float] = None
    """LoRA scale is alpha / rank; null = rank (scale 1)."""
    lora_target_modules: List[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    lora_aggregation: str = "fedavg"
    """'fedavg' (average A and B separately) or 'ffa' (A frozen at its shared random init, only
    B trained and averaged: exact, half the bytes)."""
    aggregation_error_every: int = 1
    """Log ||mean(B A) - mean(B) mean(A)|| / ||mean(B A)|| every this many rounds (0 = never).
    It needs the clients' products B_c A_c: an extra, explicit all-reduce of U-Net-sized
    matrices on those rounds only (a diagnostic of the simulator, not part of the protocol)."""
    instance_prompt: Optional[str] = None
    """Prompt of every image (DreamBooth: 'a photo of sks dog')."""
    prompts_file: Optional[str] = None
    """metadata.jsonl ({"file_name", "text"} per line) or CSV (file_name,text): one prompt per
    image; relative paths are tried in the working directory, then in data.root."""
    class_prompt: Optional[str] = None
    """DreamBooth prior preservation: the prompt of the class images ('a photo of a dog')."""
    class_data_dir: Optional[str] = None
    """Folder of class images (e.g. sampled from the base model for class_prompt); every client
    draws as many of them per step as it has subject images in its batch."""
    class_prompts_file: Optional[str] = None
    """Per-image prompts of the class images (metadata.jsonl or CSV, like prompts_file): prior
    preservation over several prompts; class_prompt then covers the images it does not list."""
    prior_loss_weight: float = 1.0
    """Weight of the class images' loss (DreamBooth's prior-preservation loss)."""
    prompt_dropout: float = 0.0
    """Probability of training on the empty prompt instead (for classifier-free guidance)."""
    validation_prompts: List[str] = field(default_factory=list)
    """Prompts of the sample grids (base model and during/after training); empty = the
    instance prompt."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the sample grids."""
    base_dtype: str = "float32"
    """dtype of the frozen base (unet, vae, text encoder): 'float32', 'float16', 'bfloat16'.
    Trainable parameters are always float32."""

    def __post_init__(self) -> None:
        _require(self.mode in ("lora", "full"), "finetune.mode",
                 f"must be 'lora' or 'full', got '{self.mode}'")
        _require(self.lora_rank >= 1, "finetune.lora_rank", f"must be >= 1, got {self.lora_rank}")
        _require(self.lora_alpha is None or self.lora_alpha > 0, "finetune.lora_alpha",
                 f"must be > 0 or null, got {self.lora_alpha}")
        _require(bool(self.lora_target_modules), "finetune.lora_target_modules", "must not be empty")
        _require(self.lora_aggregation in ("fedavg", "ffa"), "finetune.lora_aggregation",
                 f"must be 'fedavg' or 'ffa', got '{self.lora_aggregation}'")
        _require(self.aggregation_error_every >= 0, "finetune.aggregation_error_every",
                 f"must be >= 0, got {self.aggregation_error_every}")
        _require(bool(self.class_prompt or self.class_prompts_file) == bool(self.class_data_dir),
                 "finetune.class_data_dir", "goes with finetune.class_prompt or "
                 "finetune.class_prompts_file (both or neither)")
        _require(self.prior_loss_weight >= 0, "finetune.prior_loss_weight",
                 f"must be >= 0, got {self.prior_loss_weight}")
        _require(0.0 <= self.prompt_dropout < 1.0, "finetune.prompt_dropout",
                 f"must be in [0, 1), got {self.prompt_dropout}")
        _require(self.guidance_scale >= 0, "finetune.guidance_scale",
                 f"must be >= 0, got {self.guidance_scale}")
        _require(self.base_dtype in ("float32", "float16", "bfloat16"), "finetune.base_dtype",
                 f"must be 'float32', 'float16' or 'bfloat16', got '{self.base_dtype}'")


@dataclass
class PrivacyConfig:
    """Client-level differential privacy, DP-FedAvg (McMahan et al. 2018; ``fedrun.privacy``):
    each client's whole update is clipped to L2 norm ``clip_norm`` (update transform 'dp_clip'),
    Gaussian noise N(0, (noise_multiplier * clip_norm)^2) is added once to the round's sum
    (server transform 'dp_noise', seeded by (seed, round): the same on every rank), the sum is
    divided by the expected cohort size, and dp-accounting's RDP accountant reports epsilon."""

    enabled: bool = False
    """Turn DP-FedAvg on: 'dp_clip' and 'dp_noise' are appended to aggregation.update_transforms /
    aggregation.server_transforms when absent. Needs server.weighting=uniform."""
    clip_norm: float = 1.0
    """C: the L2 norm bound of one client's update (local - global, the whole federated vector)."""
    noise_multiplier: Optional[float] = None
    """sigma: noise std on the sum is sigma * clip_norm. Give it (epsilon is reported) or
    target_epsilon (sigma is calibrated before round 1), not both."""
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

    def __post_init__(self) -> None:
        _require(self.clip_norm > 0, "privacy.clip_norm", f"must be > 0, got {self.clip_norm}")
        _require(self.noise_multiplier is None or self.noise_multiplier > 0,
                 "privacy.noise_multiplier", f"must be > 0 or null, got {self.noise_multiplier}")
        _require(self.target_epsilon is None or self.target_epsilon > 0, "privacy.target_epsilon",
                 f"must be > 0 or null, got {self.target_epsilon}")
        _require(0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), got {self.delta}")
        _require(self.sampling in ("poisson", "fixed"), "privacy.sampling",
                 f"must be 'poisson' or 'fixed', got '{self.sampling}'")
        _require(self.max_noise_multiplier > 0, "privacy.max_noise_multiplier",
                 f"must be > 0, got {self.max_noise_multiplier}")
        if self.enabled:
            _require((self.noise_multiplier is None) != (self.target_epsilon is None),
                     "privacy.noise_multiplier",
                     "with privacy.enabled, set exactly one of privacy.noise_multiplier and "
                     f"privacy.target_epsilon (got {self.noise_multiplier} and {self.target_epsilon})")


@dataclass
class Config:
    """One federated (or centralized) diffusion training run."""

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

    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """``fedrun finetune`` only."""
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
        self._check_scaffold()
        for key in ("dropout_schedule", "nonfinite_schedule"):
            for _, client in getattr(self.faults, key):
                _require(client < self.num_clients, f"faults.{key}",
                         f"client {client} does not exist (num_clients={self.num_clients})")
        # A U-Net of n blocks halves the image n - 1 times and concatenates the skip connections
        # on the way up: a side that is odd before any halving breaks that concat deep in diffusers.
        # A pretrained U-Net (or the pipeline of `fedrun finetune`) is not built from model.*.
        if not (self.model.pretrained or self.finetune.pretrained):
            factor = 2 ** (len(self.model.block_out_channels) - 1)
            _require(self.data.image_size % factor == 0, "data.image_size",
                     f"{self.data.image_size} is not divisible by {factor}: the U-Net's "
                     f"{len(self.model.block_out_channels)} blocks (model.block_out_channels) halve "
                     f"the image {factor.bit_length() - 1} time(s); use a multiple of {factor} "
                     f"(e.g. {(self.data.image_size // factor + 1) * factor})")

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

    def _check_scaffold(self) -> None:
        """SCAFFOLD's option II variate (w_global - y) / (K lr) is the mean corrected gradient only
        when the K local steps are plain SGD steps of size lr: AdamW makes it the mean normalised
        step (about +-1 per coordinate), momentum scales it by up to 1 / (1 - momentum), and
        gradient clipping turns it into a mean of clipped gradients."""
        if self.client.algorithm != "scaffold":
            return
        bad = [f"optim.{key}={value}" for key, value, wanted in (
            ("name", self.optim.name, "sgd"), ("momentum", self.optim.momentum, 0.0),
            ("grad_clip", self.optim.grad_clip, None)) if value != wanted]
        _require(not bad, "client.algorithm",
                 "'scaffold' (option II control variates) needs plain SGD local steps: set "
                 "optim.name=sgd optim.momentum=0 optim.grad_clip=null (got " + ", ".join(bad)
                 + "); its variate (w_global - y) / (K lr) estimates the mean gradient only then")

    @property
    def cohort_size(self) -> int:
        return self.clients_per_round or self.num_clients


# Keys that do not change the trajectory of a run: a resumed run may change them freely.
# `rounds` is among them so that a finished run can be extended.
_DIGEST_EXEMPT = {"output_dir", "resume", "overwrite", "device", "dist_timeout_s", "threads", "rounds",
                  "sample", "checkpoint", "logging", "eval", "faults.max_rejected_rounds"}


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None,
                schema: type = Config) -> Any:
    """Merge defaults <- YAML file <- ``key=value`` overrides, validate, return the dataclass."""
    base = OmegaConf.structured(schema)
    layers = [base]
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
    try:
        merged = OmegaConf.merge(*layers)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None


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


def diff_keys(old: dict, new: dict, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested dicts, as 'key: old -> new'."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, MISSING), new.get(key, MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_keys(a, b, prefix=f"{name}."))
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out
