"""The DiT task (``task.name: dit``): ``DiTTask``, registered under the folder's name; the package
docstring (``fedrun.tasks.dit``) says what it trains, exports and scores."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from fedrun.errors import CheckpointError, ConfigError, EvaluationError
from fedrun.registry import TASKS
from fedrun.tasks.base import Built, RunSampler, Task
from fedrun.tasks.diffusion import DenoisingSteps, DiffusionConfig
from fedrun.tasks.dit.config import DiTConfig

#: final/'s folder of the transformer (``DiTTransformer2DModel.from_pretrained(final,
#: subfolder=TRANSFORMER)``) and of the training noise schedule
TRANSFORMER, SCHEDULER = "transformer", "scheduler"
#: final/'s class names ({"0": "0", ...}, DiTPipeline's ``id2label`` form) and sampling recipe
ID2LABEL, RECIPE = "id2label.json", "fedrun_dit.json"
#: the data source the shipped digits classifier reads (the label accuracy needs it)
CLASSIFIER_DATA = "digits"


@TASKS.register("dit")
class DiTTask(DenoisingSteps, Task):
    config_sections = {"dit": DiTConfig, "diffusion": DiffusionConfig}
    supports_evaluation = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.heldout = None  # the held-out split: the reference images of FID/KID
        self._evaluator = None
        self._classifier = None

    @classmethod
    def check_config(cls, cfg) -> None:
        dit, size = cfg.dit, cfg.data.image_size
        if size % dit.patch_size:
            raise ConfigError(f"config key 'data.image_size': {size} is not a multiple of "
                              f"dit.patch_size={dit.patch_size} (the DiT cuts the image into "
                              f"{dit.patch_size}x{dit.patch_size} patches)")
        if cfg.data.name == CLASSIFIER_DATA and dit.num_classes != 10:
            raise ConfigError(f"config key 'dit.num_classes': the digits have 10 classes, got "
                              f"{dit.num_classes}")

    # ------------------------------------------------------------ build and loss
    def build(self, device: torch.device) -> Built:
        from fedrun.data import build_datasets
        from fedrun.tasks.diffusion import build_noise_scheduler
        from fedrun.tasks.dit.model import build_transformer

        cfg = self.cfg
        train, self.heldout = build_datasets(cfg.data, cfg.seed)
        self.labels = class_labels(train, cfg)
        model = build_transformer(cfg.dit, train.image_size, train.num_channels, cfg.seed)
        self.dataset, self.device = train, device
        self.noise_scheduler = build_noise_scheduler(cfg.diffusion)
        return Built(train, model.to(device), self.noise_scheduler)

    def draw_step(self, indices: np.ndarray, generator: torch.Generator) -> dict:
        """The batch, its labels (a ``dit.class_dropout`` share replaced by the null class), noise
        and timesteps: all draws from ``generator``."""
        from fedrun.tasks.diffusion import draw_diffusion_inputs

        images = self.dataset.get_batch(indices).to(self.device, non_blocking=True)
        labels = self.labels[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        labels = drop_to_null(labels, self.cfg.dit.class_dropout, self.cfg.dit.num_classes, generator)
        return draw_diffusion_inputs(self.noise_scheduler, images, generator,
                                     self.cfg.diffusion.noise_draws,
                                     class_labels=labels.to(self.device))

    def describe(self, run) -> str:
        d = self.cfg.dit
        tokens = (self.cfg.data.image_size // d.patch_size) ** 2
        return (f"{run.dataset.describe()}, DiT of {d.num_layers} blocks x {d.num_attention_heads} "
                f"heads x {d.attention_head_dim} on {tokens} patches of {d.patch_size}x{d.patch_size}, "
                f"{d.num_classes} classes + null (class_dropout {d.class_dropout}, guidance "
                f"{d.guidance_scale})")

    # ------------------------------------------------------------ samples, evaluation, export
    def sample_model(self, run, weights: torch.Tensor):
        """A separate transformer holding ``weights`` (the EMA), for sampling and export."""
        from fedrun.tasks.diffusion import unet_with_weights

        return unet_with_weights(run.model, run.params, weights)

    def write_samples(self, run, done_rounds: int, logger) -> None:
        """One row per class, ceil(sample.num_images / num_classes) columns, EMA weights."""
        from fedrun.eval.images import save_grid
        from fedrun.rng import derived_generator
        from fedrun.tasks.dit.sampling import class_grid_labels, sample_classes

        s, d = self.cfg.sample, self.cfg.dit
        per_class = math.ceil(s.num_images / d.num_classes)
        images = sample_classes(self.sample_model(run, run.ema.shadow), run.noise_scheduler,
                                class_grid_labels(d.num_classes, per_class), s.scheduler, s.steps,
                                d.guidance_scale, derived_generator(s.seed))
        grid = save_grid(images, Path(self.cfg.output_dir) / "samples" / f"round_{done_rounds:05d}.png",
                         columns=per_class)
        logger.image(done_rounds, "samples", grid,
                     caption=f"EMA model after round {done_rounds}: one row per class "
                             f"(guidance {d.guidance_scale})")

    def evaluate(self, run, done_rounds: int, logger) -> dict:
        """FID/KID (with the floor) and the label accuracy of eval.num_samples samples of the EMA
        model, drawn as ``fedrun sample`` draws them; grid of the first ones (one column per class)."""
        from fedrun.eval.features import build_evaluator
        from fedrun.eval.images import save_grid
        from fedrun.eval.sampling import draw_all

        if self._evaluator is None:  # reference features and floors are computed once per run
            self._evaluator = build_evaluator(self.cfg.eval, run.dataset, self.heldout)
        sampler = RunSampler("ema", self.eval_draw(self.sample_model(run, run.ema.shadow),
                                                   run.noise_scheduler))
        images, labels = draw_all(sampler, self.cfg.eval.num_samples)
        record = self.score_samples(images, labels, self._evaluator)
        columns = self.cfg.dit.num_classes
        grid = save_grid(images[: columns * 6], Path(self.cfg.output_dir) / "samples"
                         / f"eval_round_{done_rounds:05d}.png", columns=columns)
        accuracy = record.get("label_accuracy")
        logger.image(done_rounds, "eval_samples", grid,
                     caption=f"EMA model after round {done_rounds}: FID {record['fid']:.3g} "
                             f"(floor {record['floor_fid']:.3g})"
                             + (f", label accuracy {accuracy:.3f}" if accuracy is not None else ""))
        return record

    def export(self, run, out_dir: Path) -> None:
        """final/: transformer/ (EMA weights, stock ``DiTTransformer2DModel.from_pretrained``),
        scheduler/ (the training DDPMScheduler), id2label.json and the sampling recipe."""
        out_dir = Path(out_dir)
        self.sample_model(run, run.ema.shadow).cpu().save_pretrained(str(out_dir / TRANSFORMER))
        run.noise_scheduler.save_pretrained(str(out_dir / SCHEDULER))
        names = getattr(run.dataset, "class_names", None) or [str(k) for k in range(self.cfg.dit.num_classes)]
        (out_dir / ID2LABEL).write_text(json.dumps({str(k): n for k, n in enumerate(names)}, indent=1))
        recipe = {"null_class": self.cfg.dit.num_classes, "guidance_scale": self.cfg.dit.guidance_scale,
                  "prediction_type": run.noise_scheduler.config.prediction_type,
                  "sampler": "DDIMScheduler.from_config(scheduler config, steps_offset=1); eps = "
                             "eps(null) + guidance_scale * (eps(class) - eps(null)); pixels in [-1, 1]"}
        (out_dir / RECIPE).write_text(json.dumps(recipe, indent=1))

    # ------------------------------------------------------------ finished runs
    def eval_draw(self, transformer, noise_scheduler):
        from fedrun.tasks.dit.sampling import class_draw

        e = self.cfg.eval
        return class_draw(transformer, noise_scheduler, e.scheduler, e.steps,
                          self.cfg.dit.guidance_scale, e.seed)

    def load_model(self, run_dir: Path, checkpoint: Optional[str] = None):
        """(EMA transformer, noise scheduler, label) of a finished run: ``final/`` by default,
        else a checkpoint ('latest', a round number or a folder)."""
        from fedrun.eval.sampling import checkpoint_path

        path = checkpoint_path(run_dir, checkpoint, f"{TRANSFORMER}/config.json")
        if path is None:
            from diffusers import DDPMScheduler, DiTTransformer2DModel

            final = Path(run_dir) / "final"
            transformer = DiTTransformer2DModel.from_pretrained(str(final), subfolder=TRANSFORMER)
            scheduler = DDPMScheduler.from_pretrained(str(final), subfolder=SCHEDULER)
            return transformer.eval(), scheduler, "final"
        return (*self._from_checkpoint(path), path.name)

    def _from_checkpoint(self, path: Path):
        from fedrun.engine.checkpoint import load_checkpoint
        from fedrun.tasks.diffusion import build_noise_scheduler
        from fedrun.tasks.dit.model import build_transformer

        cfg = self.cfg
        ema = load_checkpoint(path).groups.get("ema")
        if not ema or "pos_embed.proj.weight" not in ema:
            raise CheckpointError(f"checkpoint '{path}' holds no EMA DiT weights to sample from")
        channels = ema["pos_embed.proj.weight"].shape[1]
        transformer = build_transformer(cfg.dit, cfg.data.image_size, channels, cfg.seed)
        try:
            transformer.load_state_dict(ema)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint '{path}' does not fit the run's dit.* model: "
                                  f"{str(exc).splitlines()[0]}") from None
        return transformer.eval(), build_noise_scheduler(cfg.diffusion)

    def load_sampler(self, run_dir: Path, checkpoint: Optional[str]) -> RunSampler:
        transformer, noise_scheduler, label = self.load_model(Path(run_dir), checkpoint)
        return RunSampler(label, self.eval_draw(transformer, noise_scheduler))

    def score_samples(self, images: np.ndarray, labels: Optional[np.ndarray],
                      evaluator) -> Dict[str, object]:
        """FID/KID with the floor, plus how often the shipped digits classifier reads back the
        requested label (overall and per class); on other data the classifier means nothing and
        only FID/KID are reported."""
        from fedrun.eval.features import to_model_range

        record = evaluator.report(to_model_range(images), labels)  # TSTR trains on the labels
        if self.cfg.data.name != CLASSIFIER_DATA:
            return record
        if labels is None:
            raise EvaluationError("samples of a class-conditional 'dit' run need the labels they "
                                  "were drawn for (the 'labels' array that `fedrun sample` writes "
                                  "to samples.npz) to score the label accuracy")
        from fedrun.tasks.dit.sampling import label_accuracy, predicted_classes

        predicted = predicted_classes(self.digits_classifier(evaluator), images)
        return {**record, **label_accuracy(predicted, labels, self.cfg.dit.num_classes)}

    def digits_classifier(self, evaluator):
        """The evaluator's extractor when it is the digits classifier, else the shipped one."""
        if hasattr(evaluator.extractor, "predict"):
            return evaluator.extractor
        if self._classifier is None:
            from fedrun.eval.features import DigitsFeatures

            self._classifier = DigitsFeatures().eval()
        return self._classifier


def class_labels(train, cfg) -> torch.Tensor:
    """The training images' labels as the DiT's class ids; data without labels, or with a label
    the model has no class for, is refused."""
    if train.labels is None:
        raise ConfigError(f"config key 'data.name': task 'dit' is class-conditional and needs "
                          f"labelled images, but data source '{cfg.data.name}' gave none (the "
                          "digits are labelled; image_folder needs data.labels_csv and "
                          "data.label_column, hf needs data.label_column)")
    labels = torch.as_tensor(train.labels, dtype=torch.long)
    if len(labels) and (labels.min() < 0 or labels.max() >= cfg.dit.num_classes):
        raise ConfigError(f"config key 'dit.num_classes': the data's labels run from "
                          f"{int(labels.min())} to {int(labels.max())}, outside 0 .. "
                          f"{cfg.dit.num_classes - 1}")
    return labels


def drop_to_null(labels: torch.Tensor, probability: float, null: int,
                 generator: torch.Generator) -> torch.Tensor:
    """``labels`` with each replaced by the null class with ``probability`` (classifier-free
    guidance's training), drawn from ``generator``; no draw at probability 0."""
    if probability <= 0:
        return labels
    dropped = torch.rand(len(labels), generator=generator) < probability
    return torch.where(dropped, torch.full_like(labels, null), labels)
