"""Sampling products and sample quality: image grids, FID and KID with a pluggable feature
extractor, the real-vs-real floor, and the class distribution of generated digits.

Feature extractors (``eval.feature``):

* ``digits``: the penultimate 128-d features of the shipped digits classifier
  (``fedrun.digits_classifier``); its predictions also give the class distribution of the
  generated samples. Works offline. InceptionV3 features mean little on 8x8/16x16 digits.
* ``inception``: torchmetrics' standard FID InceptionV3 (2048-d pool features), which needs
  the ``torch-fidelity`` package and its weights file (downloaded on first use; offline, pass
  ``eval.inception_weights=PATH``).

Every score comes with its scale: the *floor* is the same metric computed for real training
images (as many as there are generated samples) against the same held-out reference images.
A generated set cannot be expected to score below it; a score near it is as good as the
evaluation can tell apart with this many samples.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from fedrun.errors import ConfigError, EvaluationError

FEATURE_EXTRACTORS = ("digits", "inception")
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)
# Below this many generated samples FID/KID are visibly biased (FID upward) and noisy.
MIN_UNBIASED_SAMPLES = 1000


# ---------------------------------------------------------------- grids

def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] -> one (rows*H, cols*W, 3) uint8 picture, upscaled ``scale``x."""
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    if c == 1:
        pixels = np.repeat(pixels, 3, axis=3)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top: top + h, left: left + w] = pixels[i]
    return grid


def save_grid(images: np.ndarray, path: Path, min_side: int = 256,
              columns: int | None = None) -> np.ndarray:
    """Write a PNG grid of ``images`` (square by default, or ``columns`` wide, e.g. one row per
    prompt); small images are upscaled (nearest) so the PNG is legible."""
    from PIL import Image

    side = images.shape[1]
    columns = columns or int(math.ceil(math.sqrt(len(images))))
    scale = max(1, min_side // (side * columns))
    grid = make_grid(images, columns=columns, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(grid).save(tmp, format="PNG")
    tmp.replace(path)
    return grid


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) floats in [0, 1] (what the pipelines return) -> (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2.0 - 1.0


# ---------------------------------------------------------------- feature extractors

class DigitsFeatures(torch.nn.Module):
    """The digits classifier's 128-d penultimate features; input (N, C, H, W) in [-1, 1].

    The features are divided by a fixed constant, their RMS on the default digits training split
    (5.745), so that they are of order 1 like InceptionV3's: KID's polynomial kernel
    (x.y/d + 1)^3 is otherwise dominated by the cubic term and its estimate is very noisy.
    """

    FEATURE_RMS = 5.745

    def __init__(self):
        super().__init__()
        from fedrun.digits_classifier import load_digits_classifier

        self.classifier = load_digits_classifier()
        self.num_features = self.classifier.num_features
        self.num_classes = self.classifier.head.out_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images) / self.FEATURE_RMS

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images).argmax(dim=1)


class InceptionFeatures(torch.nn.Module):
    """torchmetrics' FID InceptionV3 (2048-d); input (N, C, H, W) in [-1, 1], any size/channels."""

    num_features = 2048

    def __init__(self, weights_path: Optional[str] = None):
        super().__init__()
        self.inception = _build_inception(weights_path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        return self.inception(pixels)  # resizes to 299x299 itself


def _inception_help() -> str:
    return (f"the InceptionV3 FID weights are the file {INCEPTION_WEIGHTS_FILE} "
            f"({INCEPTION_WEIGHTS_URL}); without internet, download it elsewhere and pass "
            "eval.inception_weights=/path/to/" + INCEPTION_WEIGHTS_FILE
            + " (or put it in the torch hub cache, $TORCH_HOME/hub/checkpoints/). "
              "The 'digits' extractor (eval.feature=digits) needs neither")


def _build_inception(weights_path: Optional[str]):
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        import torch_fidelity  # noqa: F401  (torchmetrics' InceptionV3 is torch-fidelity's)
    except ImportError:
        raise EvaluationError("feature extractor 'inception' needs the torch-fidelity package "
                              "(pip install torch-fidelity), which is not installed; and "
                              + _inception_help()) from None
    if weights_path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        weights_path = str(cached) if cached.is_file() else None
    elif not Path(weights_path).is_file():
        raise EvaluationError(f"config key 'eval.inception_weights': '{weights_path}' is not a file; "
                              + _inception_help())
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                  feature_extractor_weights_path=weights_path)
    except Exception as exc:  # urllib errors, hub errors, corrupt files
        raise EvaluationError(f"could not obtain the InceptionV3 FID weights ({exc}); "
                              + _inception_help()) from None


def build_feature_extractor(name: str, inception_weights: Optional[str] = None) -> torch.nn.Module:
    """A module mapping (N, C, H, W) images in [-1, 1] to (N, num_features) features."""
    if name == "digits":
        return DigitsFeatures().eval()
    if name == "inception":
        return InceptionFeatures(inception_weights).eval()
    raise ConfigError(f"config key 'eval.feature': unknown feature extractor '{name}' "
                      f"(choose one of: {', '.join(FEATURE_EXTRACTORS)})")


# ---------------------------------------------------------------- scores

def bias_warning(num_samples: int) -> Optional[str]:
    if num_samples >= MIN_UNBIASED_SAMPLES:
        return None
    return (f"FID/KID from {num_samples} samples are biased (FID upward) and noisy; use >= "
            f"{MIN_UNBIASED_SAMPLES} (eval.num_samples) and compare only numbers computed with the "
            "same number of samples (the paper's 64 samples are far too few)")


@dataclass
class Scores:
    fid: float
    kid: float
    kid_std: float
    num_samples: int
    num_reference: int
    class_fractions: Optional[List[float]] = None
    class_tv: Optional[float] = None  # total variation distance to the reference class mix

    def as_record(self, prefix: str = "") -> Dict[str, object]:
        out = {f"{prefix}fid": self.fid, f"{prefix}kid": self.kid, f"{prefix}kid_std": self.kid_std}
        if self.class_tv is not None:
            out[f"{prefix}class_tv"] = self.class_tv
        return out


class Evaluator:
    """FID/KID of image sets against a fixed reference set (the held-out images).

    ``floor_pool`` (the training images) gives the real-vs-real floor: as many real images as
    the scored set, against the same reference, through the same features.
    """

    def __init__(self, reference: torch.Tensor, floor_pool: torch.Tensor, extractor: torch.nn.Module,
                 feature_name: str, reference_labels: Optional[np.ndarray] = None,
                 kid_subset_size: int = 100, seed: int = 0, batch_size: int = 500):
        if len(reference) < 2:
            raise EvaluationError(f"FID needs at least 2 held-out reference images, got {len(reference)}; "
                                  "raise data.heldout_fraction")
        self.reference = reference
        self.floor_pool = floor_pool
        self.extractor = extractor
        self.feature_name = feature_name
        self.kid_subset_size = kid_subset_size
        self.seed = seed
        self.batch_size = batch_size
        self.reference_features = self._features(reference)
        self.reference_class_fractions = None
        if reference_labels is not None and hasattr(extractor, "predict"):
            counts = np.bincount(np.asarray(reference_labels), minlength=extractor.num_classes)
            self.reference_class_fractions = counts / counts.sum()
        self._floors: Dict[int, Scores] = {}

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.extractor(images[i: i + self.batch_size]).double()
                          for i in range(0, len(images), self.batch_size)])

    def score(self, images: torch.Tensor) -> Scores:
        """FID and KID of ``images`` ((N, C, H, W) in [-1, 1]) against the reference."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        if len(images) < 2:
            raise EvaluationError(f"FID needs at least 2 samples, got {len(images)}")
        features = self._features(images)
        # The metrics get the features already computed (an identity "extractor"): the
        # extractor runs once per image, and torchmetrics does the statistics in float64.
        # sync_on_compute=False: only the calling rank evaluates, never a collective here.
        identity = _Identity(features.shape[1])
        fid = FrechetInceptionDistance(feature=identity, sync_on_compute=False)
        fid.update(self.reference_features, real=True)
        fid.update(features, real=False)
        subset = min(self.kid_subset_size, len(features), len(self.reference_features))
        with warnings.catch_warnings():  # "KID will save all extracted features": they are few
            warnings.simplefilter("ignore")
            kid = KernelInceptionDistance(feature=identity, subsets=50, subset_size=subset,
                                          sync_on_compute=False)
        kid.update(self.reference_features, real=True)
        kid.update(features, real=False)
        with torch.random.fork_rng():  # KID draws its subsets from the global generator
            torch.manual_seed(self.seed)
            kid_mean, kid_std = kid.compute()
        scores = Scores(float(fid.compute()), float(kid_mean), float(kid_std), len(images),
                        len(self.reference))
        if self.reference_class_fractions is not None:
            predicted = torch.cat([self.extractor.predict(images[i: i + self.batch_size])
                                   for i in range(0, len(images), self.batch_size)])
            counts = np.bincount(predicted.numpy(), minlength=len(self.reference_class_fractions))
            scores.class_fractions = (counts / counts.sum()).round(4).tolist()
            scores.class_tv = float(0.5 * np.abs(counts / counts.sum() - self.reference_class_fractions).sum())
        return scores

    def floor(self, num_samples: int) -> Scores:
        """The same metrics for ``num_samples`` real training images (seeded choice, cached)."""
        n = min(num_samples, len(self.floor_pool))
        if n not in self._floors:
            order = torch.randperm(len(self.floor_pool), generator=torch.Generator().manual_seed(self.seed))
            self._floors[n] = self.score(self.floor_pool[order[:n]])
        return self._floors[n]

    def report(self, images: torch.Tensor) -> Dict[str, object]:
        """Scores of ``images`` with the floor and the sample counts, as one flat record."""
        scores = self.score(images)
        floor = self.floor(len(images))
        record = {**scores.as_record(), **floor.as_record("floor_"),
                  "eval_samples": scores.num_samples, "eval_reference": scores.num_reference,
                  "eval_floor_samples": floor.num_samples, "eval_feature": self.feature_name}
        if scores.class_fractions is not None:
            record["class_fractions"] = scores.class_fractions
        warning = bias_warning(scores.num_samples)
        if warning:
            record["eval_warning"] = warning
        return record


class _Identity(torch.nn.Module):
    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def build_evaluator(eval_cfg, train, heldout) -> Evaluator:
    """Evaluator for a run: reference = the held-out split, floor pool = the training split."""
    extractor = build_feature_extractor(eval_cfg.feature, eval_cfg.inception_weights)
    if len(heldout) < 2:
        raise EvaluationError(f"FID needs held-out images but the held-out split has {len(heldout)}; "
                              "set data.heldout_fraction > 0 (default 0.1)")
    everything = lambda data: data.get_batch(np.arange(len(data)))  # noqa: E731
    return Evaluator(everything(heldout), everything(train), extractor, eval_cfg.feature,
                     reference_labels=heldout.labels if eval_cfg.feature == "digits" else None,
                     kid_subset_size=eval_cfg.kid_subset_size, seed=eval_cfg.seed)


def generate(unet, noise_scheduler, eval_cfg, num_samples: Optional[int] = None) -> np.ndarray:
    """``num_samples`` (default eval.num_samples) images from ``unet`` with the eval sampler."""
    from fedrun.models import sample_images

    return sample_images(unet, noise_scheduler, num_samples or eval_cfg.num_samples,
                         eval_cfg.scheduler, eval_cfg.steps, eval_cfg.seed)


def warn_if_few(num_samples: int) -> None:
    message = bias_warning(num_samples)
    if message:
        warnings.warn(message, stacklevel=2)


# ---------------------------------------------------------------- runs on disk: sample, evaluate

def open_run(run_dir, overrides: Optional[List[str]] = None):
    """The resolved config of the run in ``run_dir`` (with ``overrides``); clear errors otherwise."""
    from fedrun.config import load_config
    from fedrun.errors import CheckpointError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory '{run_dir}' does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"'{run_dir}' is not a fedrun run directory (it has no config.yaml)")
    return load_config(str(run_dir / "config.yaml"), overrides)


def load_run_model(run_dir, cfg, checkpoint: Optional[str] = None):
    """(EMA U-Net, noise scheduler, label) of a run: ``final/`` by default, else the newest
    checkpoint; ``checkpoint`` may be 'final', 'latest', a round number or a checkpoint folder."""
    from fedrun.checkpoint import list_checkpoints
    from fedrun.errors import CheckpointError

    run_dir = Path(run_dir)
    final = run_dir / "final"
    found = list_checkpoints(run_dir)
    if checkpoint is None:
        checkpoint = "final" if (final / "model_index.json").is_file() else "latest"
    if checkpoint == "final":
        if not (final / "model_index.json").is_file():
            raise CheckpointError(f"run '{run_dir}' has no final/ pipeline (unfinished?); "
                                  "use checkpoint=latest or a round number")
        from diffusers import DDPMPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        pipe = DDPMPipeline.from_pretrained(str(final))
        return pipe.unet.eval(), pipe.scheduler, "final"
    if checkpoint == "latest":
        if not found:
            raise CheckpointError(f"run '{run_dir}' has no checkpoint and no final/ folder: nothing to "
                                  "sample from (did it stop before its first checkpoint?)")
        path = found[-1][1]
    elif str(checkpoint).isdigit():
        rounds = {r: p for r, p in found}
        if int(checkpoint) not in rounds:
            raise CheckpointError(f"run '{run_dir}' has no checkpoint of round {checkpoint} "
                                  f"(available: {sorted(rounds) or 'none'})")
        path = rounds[int(checkpoint)]
    else:
        path = Path(checkpoint)
    return (*_unet_from_checkpoint(path, cfg), path.name)


def _unet_from_checkpoint(path: Path, cfg):
    from fedrun.checkpoint import load_checkpoint
    from fedrun.errors import CheckpointError
    from fedrun.models import build_noise_scheduler, build_unet

    ckpt = load_checkpoint(path)
    ema = ckpt.groups.get("ema")
    if not ema or "conv_in.weight" not in ema:
        raise CheckpointError(f"checkpoint '{path}' holds no EMA U-Net weights to sample from")
    unet = build_unet(cfg.model, cfg.data.image_size, ema["conv_in.weight"].shape[1], cfg.seed)
    missing, unexpected = unet.load_state_dict(ema, strict=False)
    if unexpected or len(missing) == len(unet.state_dict()):
        raise CheckpointError(f"checkpoint '{path}' does not fit the run's model "
                              f"({len(unexpected)} unexpected, {len(missing)} missing tensors)")
    return unet.eval(), build_noise_scheduler(cfg.diffusion)


def sample_run(run_dir, cfg, checkpoint: Optional[str] = None, out: Optional[str] = None,
               say=print) -> Optional[Path]:
    """``eval.num_samples`` samples of a run's EMA model to ``samples.npz`` + ``grid.png``; under
    torchrun each rank draws its share of the chunks and rank 0 assembles them."""
    from fedrun import dist
    from fedrun.models import sample_chunks

    dist.init(cfg.device, cfg.dist_timeout_s, cfg.threads)
    rank, world = dist.rank(), dist.world_size()
    unet, noise_scheduler, label = load_run_model(run_dir, cfg, checkpoint)
    e = cfg.eval
    folder = Path(out) if out else (Path(run_dir) / "generated" /
                                    f"{label}_{e.scheduler}{e.steps if e.scheduler == 'ddim' else ''}"
                                    f"_n{e.num_samples}_seed{e.seed}")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    chunks = sample_chunks(unet, noise_scheduler, e.num_samples, e.scheduler, e.steps, e.seed, rank, world)
    np.savez(folder / f".rank{rank}.npz", **{str(i): a for i, a in chunks.items()})
    dist.barrier()
    if rank != 0:
        return None
    parts = {}
    for r in range(world):
        shard = folder / f".rank{r}.npz"
        with np.load(shard) as data:
            parts.update({int(k): data[k] for k in data.files})
        shard.unlink()
    images = np.concatenate([parts[i] for i in sorted(parts)])
    np.savez_compressed(folder / "samples.npz", images=(images * 255).round().astype(np.uint8))
    save_grid(images[:64], folder / "grid.png")
    info = {"run": str(run_dir), "model": label, "num_samples": len(images), "scheduler": e.scheduler,
            "steps": e.steps, "seed": e.seed, "world_size": world,
            "seconds": time.perf_counter() - started}
    (folder / "info.json").write_text(json.dumps(info, indent=1))
    say(f"{len(images)} samples of {run_dir} ({label}, {e.scheduler}) in {info['seconds']:.0f} s "
        f"on {world} rank(s): {folder / 'samples.npz'}")
    return folder


def load_samples(path) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] from a samples.npz written by ``fedrun sample``."""
    from fedrun.errors import EvaluationError

    path = Path(path)
    if path.is_dir():
        path = path / "samples.npz"
    if not path.is_file():
        raise EvaluationError(f"samples file '{path}' does not exist")
    with np.load(path) as data:
        if "images" not in data.files:
            raise EvaluationError(f"'{path}' holds no 'images' array (not written by fedrun sample)")
        return data["images"].astype(np.float32) / 255.0


def evaluate_run(run_dir, cfg, checkpoint: Optional[str] = None, samples: Optional[str] = None,
                 say=print) -> dict:
    """FID/KID (+ floor, class mix) of a run's samples: from ``samples`` or freshly generated."""
    from fedrun import dist
    from fedrun.data import build_datasets

    device = dist.init(cfg.device, cfg.dist_timeout_s, cfg.threads)
    del device
    evaluator = build_evaluator(cfg.eval, *build_datasets(cfg.data, cfg.seed))
    if samples is not None:
        images, label = load_samples(samples), str(samples)
    else:
        unet, noise_scheduler, label = load_run_model(run_dir, cfg, checkpoint)
        images = generate(unet, noise_scheduler, cfg.eval)
    warn_if_few(len(images))
    record = {"run": str(run_dir), "model": label, **evaluator.report(to_model_range(images))}
    name = f"evaluation_{Path(label).name if samples is None else 'samples'}_{cfg.eval.feature}.json"
    (Path(run_dir) / name).write_text(json.dumps(record, indent=1))
    say(f"FID {record['fid']:.4g} (floor {record['floor_fid']:.4g}), KID {record['kid']:.4g} ± "
        f"{record['kid_std']:.3g} (floor {record['floor_kid']:.4g}); {record['eval_samples']} samples vs "
        f"{record['eval_reference']} held-out images, {cfg.eval.feature} features -> {Path(run_dir) / name}")
    return record
