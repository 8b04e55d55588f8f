"""The pre-training task: an unconditional DDPM (diffusers UNet2DModel) on images.

A task is what the generic round loop (``fedrun.simulator``) does not know: how to build the
data and the model, the loss of one batch, how to draw samples, how to export. The federated
state is always the model's trainable parameters (here: the whole U-Net).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedrun.client import diffusion_loss
from fedrun.config import Config


@dataclass
class Built:
    """What a task builds for the round loop."""

    dataset: Any  # .get_batch(indices), __len__, .labels (None allowed)
    model: torch.nn.Module  # trainable parameters = the federated state
    noise_scheduler: Any


class PretrainTask:
    name = "train"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.heldout = None  # the held-out split: the reference images of FID/KID
        self._evaluator = None

    def build(self, device: torch.device) -> Built:
        from fedrun.data import build_datasets
        from fedrun.models import build_noise_scheduler, build_unet

        cfg = self.cfg
        train, self.heldout = build_datasets(cfg.data, cfg.seed)
        unet = build_unet(cfg.model, train.image_size, train.num_channels, cfg.seed).to(device)
        return Built(train, unet, build_noise_scheduler(cfg.diffusion))

    def make_loss(self, fed):
        """loss(batch_indices, generator) -> scalar tensor, for the client loop."""
        def loss(indices, generator):
            images = fed.dataset.get_batch(indices).to(fed.device, non_blocking=True)
            return diffusion_loss(fed.model, fed.noise_scheduler, images, generator)
        return loss

    def describe(self, fed) -> str:
        return f"{len(fed.dataset)} training images"

    def sample_model(self, fed, weights: torch.Tensor):
        """A separate U-Net holding ``weights`` (the EMA), for sampling and export."""
        from fedrun.models import unet_with_weights

        return unet_with_weights(fed.model, fed.params, weights)

    def write_samples(self, fed, done_rounds: int, logger) -> None:
        from fedrun.evaluate import save_grid
        from fedrun.models import sample_images

        cfg = self.cfg.sample
        images = sample_images(self.sample_model(fed, fed.ema.shadow), fed.noise_scheduler,
                               cfg.num_images, cfg.scheduler, cfg.steps, cfg.seed)
        grid = save_grid(images, Path(self.cfg.output_dir) / "samples" / f"round_{done_rounds:05d}.png")
        logger.image(done_rounds, "samples", grid, caption=f"EMA model after round {done_rounds}")

    def evaluate(self, fed, done_rounds: int, logger) -> dict:
        """FID/KID (with the floor) of eval.num_samples samples of the EMA model; grid to W&B."""
        from fedrun.evaluate import build_evaluator, generate, save_grid, to_model_range

        if self._evaluator is None:  # reference features and floors are computed once per run
            self._evaluator = build_evaluator(self.cfg.eval, fed.dataset, self.heldout)
        images = generate(self.sample_model(fed, fed.ema.shadow), fed.noise_scheduler, self.cfg.eval)
        record = self._evaluator.report(to_model_range(images))
        grid = save_grid(images[:64], Path(self.cfg.output_dir) / "samples" / f"eval_round_{done_rounds:05d}.png")
        logger.image(done_rounds, "eval_samples", grid,
                     caption=f"EMA model after round {done_rounds}: FID {record['fid']:.3g} "
                             f"(floor {record['floor_fid']:.3g}, {record['eval_feature']} features)")
        return record

    def export(self, fed, out_dir: Path) -> None:
        """A stock DDPMPipeline with the EMA weights."""
        from fedrun.models import export_pipeline

        export_pipeline(self.sample_model(fed, fed.ema.shadow), fed.noise_scheduler, out_dir)
