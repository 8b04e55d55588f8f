"""The pre-training task: an unconditional DDPM (diffusers UNet2DModel) on images, the paper's
first experiment (``task.name: ddpm``, the default).

The federated state is the whole U-Net; ``final/`` is a stock ``DDPMPipeline`` holding the EMA
weights. Sections: ``model`` (the U-Net) and ``diffusion`` (the noise schedule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fedrun.errors import CheckpointError, ConfigError
from fedrun.registry import TASKS
from fedrun.tasks.base import Built, Task
from fedrun.tasks.ddpm.config import ModelConfig
from fedrun.tasks.diffusion import DenoisingSteps, DiffusionConfig


@TASKS.register("ddpm")
class DDPMTask(DenoisingSteps, Task):
    config_sections = {"model": ModelConfig, "diffusion": DiffusionConfig}
    supports_evaluation = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.heldout = None  # the held-out split: the reference images of FID/KID
        self._evaluator = None

    @classmethod
    def check_config(cls, cfg) -> None:
        from fedrun.eval.tstr import check_unconditional

        check_unconditional(cfg)  # eval.tstr: the digits classifier labels the samples
        if cfg.model.lora_rank and not cfg.model.pretrained:
            raise ConfigError("config key 'model.lora_rank': LoRA fine-tunes a pretrained U-Net; set "
                              "model.pretrained (e.g. the final/ folder of a pre-training run)")
        # A U-Net of n blocks halves the image n - 1 times and concatenates the skip connections
        # on the way up: a side that is odd before any halving breaks that concat deep in
        # diffusers. A pretrained U-Net is not built from model.*.
        if cfg.model.pretrained:
            return
        factor = 2 ** (len(cfg.model.block_out_channels) - 1)
        if cfg.data.image_size % factor:
            raise ConfigError(
                f"config key 'data.image_size': {cfg.data.image_size} is not divisible by {factor}: "
                f"the U-Net's {len(cfg.model.block_out_channels)} blocks (model.block_out_channels) "
                f"halve the image {factor.bit_length() - 1} time(s); use a multiple of {factor} "
                f"(e.g. {(cfg.data.image_size // factor + 1) * factor})")

    def build(self, device: torch.device) -> Built:
        from fedrun.data import build_datasets
        from fedrun.tasks.ddpm.model import build_unet
        from fedrun.tasks.diffusion import build_noise_scheduler

        cfg = self.cfg
        train, self.heldout = build_datasets(cfg.data, cfg.seed)
        unet = build_unet(cfg.model, train.image_size, train.num_channels, cfg.seed).to(device)
        self.dataset, self.device = train, device
        self.noise_scheduler = build_noise_scheduler(cfg.diffusion)
        return Built(train, unet, self.noise_scheduler)

    def draw_step(self, indices: np.ndarray, generator: torch.Generator) -> dict:
        """The batch, its noise and timesteps (``diffusion.noise_draws`` per image)."""
        from fedrun.tasks.diffusion import draw_diffusion_inputs

        images = self.dataset.get_batch(indices).to(self.device, non_blocking=True)
        return draw_diffusion_inputs(self.noise_scheduler, images, generator,
                                     self.cfg.diffusion.noise_draws)

    def describe(self, run) -> str:
        return f"{len(run.dataset)} training images"

    def sample_model(self, run, weights: torch.Tensor):
        """A separate U-Net holding ``weights`` (the EMA), for sampling and export; with LoRA,
        the pretrained base with those LoRA weights merged in."""
        from fedrun.tasks.diffusion import unet_with_weights

        if self.cfg.model.lora_rank:
            import copy

            from fedrun.tasks.ddpm.model import merged_unet

            clone = copy.deepcopy(run.model)  # the training replica keeps its LoRA layers
            clone.load_state_dict(run.params.state_dict(weights), strict=False)
            return merged_unet(clone).eval()
        return unet_with_weights(run.model, run.params, weights)

    def write_samples(self, run, done_rounds: int, logger) -> None:
        from fedrun.eval.images import save_grid
        from fedrun.tasks.diffusion import sample_images

        cfg = self.cfg.sample
        images = sample_images(self.sample_model(run, run.ema.shadow), run.noise_scheduler,
                               cfg.num_images, cfg.scheduler, cfg.steps, cfg.seed)
        grid = save_grid(images, Path(self.cfg.output_dir) / "samples" / f"round_{done_rounds:05d}.png")
        logger.image(done_rounds, "samples", grid, caption=f"EMA model after round {done_rounds}")

    def evaluate(self, run, done_rounds: int, logger) -> dict:
        """FID/KID (with the floor) of eval.num_samples samples of the EMA model; grid to W&B."""
        from fedrun.eval.features import build_evaluator, to_model_range
        from fedrun.eval.images import save_grid
        from fedrun.tasks.diffusion import generate

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
        from fedrun.tasks.diffusion import export_pipeline

        export_pipeline(self.sample_model(run, run.ema.shadow), run.noise_scheduler, out_dir)

    # ------------------------------------------------------------ finished runs
    def load_model(self, run_dir: Path, checkpoint: Optional[str] = None):
        """(EMA U-Net, noise scheduler, label) of a finished run: ``final/`` (a DDPMPipeline) by
        default, else a checkpoint ('latest', a round number or a folder)."""
        from fedrun.eval.sampling import checkpoint_path

        path = checkpoint_path(run_dir, checkpoint, "model_index.json")
        if path is None:
            from diffusers import DDPMPipeline
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
            pipe = DDPMPipeline.from_pretrained(str(Path(run_dir) / "final"))
            return pipe.unet.eval(), pipe.scheduler, "final"
        return (*self._unet_from_checkpoint(path), path.name)

    def _unet_from_checkpoint(self, path: Path):
        from fedrun.engine.checkpoint import load_checkpoint
        from fedrun.tasks.ddpm.model import build_unet
        from fedrun.tasks.diffusion import build_noise_scheduler

        cfg = self.cfg
        ckpt = load_checkpoint(path)
        ema = ckpt.groups.get("ema")
        lora = bool(cfg.model.lora_rank)  # its EMA holds the LoRA weights only
        if not ema or (not lora and "conv_in.weight" not in ema):
            raise CheckpointError(f"checkpoint '{path}' holds no EMA U-Net weights to sample from")
        channels = None if lora else ema["conv_in.weight"].shape[1]  # LoRA: the pretrained U-Net's
        unet = build_unet(cfg.model, cfg.data.image_size, channels, cfg.seed)
        missing, unexpected = unet.load_state_dict(ema, strict=False)
        if unexpected or len(missing) == len(unet.state_dict()):
            raise CheckpointError(f"checkpoint '{path}' does not fit the run's model "
                                  f"({len(unexpected)} unexpected, {len(missing)} missing tensors)")
        if lora:
            from fedrun.tasks.ddpm.model import merged_unet

            unet = merged_unet(unet)
        return unet.eval(), build_noise_scheduler(cfg.diffusion)

    def load_sampler(self, run_dir: Path, checkpoint: Optional[str]):
        from fedrun.eval.sampling import RunSampler
        from fedrun.rng import derived_generator
        from fedrun.tasks.diffusion import build_sampling_pipeline

        unet, noise_scheduler, label = self.load_model(run_dir, checkpoint)
        e = self.cfg.eval
        pipe = build_sampling_pipeline(unet, noise_scheduler, e.scheduler)
        kwargs = {"num_inference_steps": e.steps} if e.scheduler == "ddim" else {}

        def draw(n: int, index: int):
            with torch.no_grad():  # chunk ``index`` from (eval.seed, index): rank-independent
                images = pipe(batch_size=n, generator=derived_generator(e.seed, index),
                              output_type="np", **kwargs).images
            return images, None

        return RunSampler(label, draw)

    def audit_subject(self, run_dir: Path, heldout: Optional[str]):
        from fedrun.tasks.ddpm.audit import ddpm_subject

        return ddpm_subject(self, Path(run_dir))
