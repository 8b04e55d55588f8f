"""The pre-training task: an unconditional DDPM (diffusers UNet2DModel) on images.

The federated state is the whole U-Net; ``final/`` is a stock ``DDPMPipeline`` holding the EMA
weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedrun.task import TASKS, Built, Task


@TASKS.register("train")
class PretrainTask(Task):
    supports_evaluation = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.heldout = None  # the held-out split: the reference images of FID/KID
        self._evaluator = None

    def build(self, device: torch.device) -> Built:
        from fedrun.data import build_datasets
        from fedrun.models import build_noise_scheduler, build_unet

        cfg = self.cfg
        train, self.heldout = build_datasets(cfg.data, cfg.seed)
        unet = build_unet(cfg.model, train.image_size, train.num_channels, cfg.seed).to(device)
        self.dataset, self.device = train, device
        self.noise_scheduler = build_noise_scheduler(cfg.diffusion)
        return Built(train, unet, self.noise_scheduler)

    def loss(self, model, indices: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        from fedrun.models import diffusion_loss

        images = self.dataset.get_batch(indices).to(self.device, non_blocking=True)
        return diffusion_loss(model, self.noise_scheduler, images, generator)

    def describe(self, run) -> str:
        return f"{len(run.dataset)} training images"

    def sample_model(self, run, weights: torch.Tensor):
        """A separate U-Net holding ``weights`` (the EMA), for sampling and export."""
        from fedrun.models import unet_with_weights

        return unet_with_weights(run.model, run.params, weights)

    def write_samples(self, run, done_rounds: int, logger) -> None:
        from fedrun.grids import save_grid
        from fedrun.models import sample_images

        cfg = self.cfg.sample
        images = sample_images(self.sample_model(run, run.ema.shadow), run.noise_scheduler,
                               cfg.num_images, cfg.scheduler, cfg.steps, cfg.seed)
        grid = save_grid(images, Path(self.cfg.output_dir) / "samples" / f"round_{done_rounds:05d}.png")
        logger.image(done_rounds, "samples", grid, caption=f"EMA model after round {done_rounds}")

    def evaluate(self, run, done_rounds: int, logger) -> dict:
        """FID/KID (with the floor) of eval.num_samples samples of the EMA model; grid to W&B."""
        from fedrun.features import build_evaluator, generate, to_model_range
        from fedrun.grids import save_grid

        if self._evaluator is None:  # reference features and floors are computed once per run
            self._evaluator = build_evaluator(self.cfg.eval, run.dataset, self.heldout)
        images = generate(self.sample_model(run, run.ema.shadow), run.noise_scheduler, self.cfg.eval)
        record = self._evaluator.report(to_model_range(images))
        grid = save_grid(images[:64], Path(self.cfg.output_dir) / "samples" / f"eval_round_{done_rounds:05d}.png")
        logger.image(done_rounds, "eval_samples", grid,
                     caption=f"EMA model after round {done_rounds}: FID {record['fid']:.3g} "
                             f"(floor {record['floor_fid']:.3g}, {record['eval_feature']} features)")
        return record

    def export(self, run, out_dir: Path) -> None:
        """A stock DDPMPipeline with the EMA weights."""
        from fedrun.models import export_pipeline

        export_pipeline(self.sample_model(run, run.ema.shadow), run.noise_scheduler, out_dir)
