"""What the diffusion tasks share: the noise schedule (config section ``diffusion``), the
diffusion loss, unconditional sampling with stock diffusers pipelines, and export. This module
owns diffusers' scheduler and pipeline classes; a task's own model lives in its folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from fedrun.errors import ConfigError
from fedrun.rng import derived_generator


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


@dataclass
class DiffusionConfig:
    """DDPM noise schedule (paper: linear beta 1e-4 .. 0.02, T = 1000, epsilon prediction)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    """'epsilon' (the added noise), 'v_prediction' or 'sample' (x0)."""
    noise_draws: int = 1
    """Noise multiplicity: (timestep, noise) draws per training image, their losses averaged
    (DPDM, Dockhorn et al. 2023). The batch is repeated along dim 0 and run in one forward, so
    a step costs up to ``noise_draws`` times the compute (8 draws at batch 1: about 3x on a CPU);
    under DP it makes each client's clipped update less its draws' and more its images'
    (docs/benchmarks/noise_draws). 1 = one draw per image (the plain DDPM loss)."""

    def __post_init__(self) -> None:
        _require(self.noise_draws >= 1, "diffusion.noise_draws",
                 f"must be >= 1 (draws per image), got {self.noise_draws}")
        _require(self.num_train_timesteps >= 2, "diffusion.num_train_timesteps",
                 f"must be >= 2, got {self.num_train_timesteps}")
        _require(0 < self.beta_start < self.beta_end < 1, "diffusion.beta_start",
                 f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        _require(self.prediction_type in ("epsilon", "v_prediction", "sample"),
                 "diffusion.prediction_type", f"unknown '{self.prediction_type}'")


def build_noise_scheduler(cfg: DiffusionConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


def diffusion_target(noise_scheduler, x0: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict under the scheduler's prediction type."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(x0, noise, timesteps)
    return x0


def repeat_draws(images: torch.Tensor, conditioning: dict, draws: int):
    """``images`` and every tensor of ``conditioning`` tiled ``draws`` times along dim 0 (one
    forward pass computes all the draws)."""
    tile = lambda t: t.repeat(draws, *([1] * (t.dim() - 1)))  # noqa: E731
    return tile(images), {k: tile(v) if torch.is_tensor(v) else v for k, v in conditioning.items()}


def diffusion_loss(model, noise_scheduler, images: torch.Tensor, generator: torch.Generator | None,
                   noise_draws: int = 1, **conditioning):
    """The DDPM objective: MSE between the added noise (or v / x0) and the model's prediction.

    Noise and timesteps are drawn from ``generator``, the caller's seeded stream (a client's
    (seed, client, round) or a centralized micro-batch's (seed, step, offset)). ``images`` may
    be VAE latents; ``conditioning`` is passed to the model (``encoder_hidden_states`` of a
    text-to-image U-Net, ``class_labels`` of a class-conditional DiT). ``noise_draws`` > 1
    draws that many (timestep, noise) pairs per image and averages their losses
    (``diffusion.noise_draws``); 1 is the plain loss, bit for bit."""
    inputs = draw_diffusion_inputs(noise_scheduler, images, generator, noise_draws, **conditioning)
    return denoising_loss(model, noise_scheduler, **inputs)


def draw_diffusion_inputs(noise_scheduler, images: torch.Tensor, generator: torch.Generator | None,
                          noise_draws: int = 1, **conditioning) -> dict:
    """What ``diffusion_loss`` draws, in its order (noise, then timesteps, from ``generator``),
    with the images and conditioning tiled ``noise_draws`` times: the keyword arguments of
    ``denoising_loss``. Vectorized clients (``fedrun.fl.vectorized``) draw them client by
    client, outside vmap."""
    if noise_draws > 1:  # every draw has the same size: the MSE's mean is the mean over draws
        images, conditioning = repeat_draws(images, conditioning, noise_draws)
    batch = images.shape[0]
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,),
                              generator=generator).to(images.device)
    return {"images": images, "noise": noise, "timesteps": timesteps, **conditioning}


def denoising_loss(model, noise_scheduler, images: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, **conditioning) -> torch.Tensor:
    """The DDPM objective given its drawn inputs (``draw_diffusion_inputs``); draws nothing."""
    import torch.nn.functional as F

    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    prediction = model(noisy, timesteps, **conditioning).sample
    target = diffusion_target(noise_scheduler, images, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())


class DenoisingSteps:
    """The training loss of a task whose ``draw_step`` returns ``draw_diffusion_inputs``' keyword
    arguments (ddpm, dit): ``loss`` is ``step_loss`` of ``draw_step``, the one definition both
    the sequential and the vectorized clients (``client.vectorize``) run; under vmap the
    attention uses the classic processor (``with_classic_attention``). Listed before ``Task``."""

    supports_vectorized_clients = True

    def loss(self, model, indices, generator: torch.Generator) -> torch.Tensor:
        return self.step_loss(model, self.draw_step(indices, generator))

    def step_loss(self, model, inputs: dict) -> torch.Tensor:
        return denoising_loss(model, self.noise_scheduler, **inputs)

    def functional_model(self, model):
        return with_classic_attention(model)


def with_classic_attention(model):
    """A copy of ``model`` whose attention modules run diffusers' classic ``AttnProcessor``
    (the same function): the SDPA backward has no vmap batching rule on CPU, and falls back to a
    slow per-client loop; vectorized clients (``Task.functional_model``) use this copy."""
    import copy

    from diffusers.models.attention_processor import Attention, AttnProcessor

    clone = copy.deepcopy(model)
    for module in clone.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())
    return clone


def unet_with_weights(unet, flat, vector: torch.Tensor):
    """A separate model (same config) holding ``vector``: for sampling and export, leaving the
    training replica untouched."""
    clone = type(unet).from_config(unet.config)
    clone.load_state_dict(flat.state_dict(vector), strict=False)
    return clone.to(vector.device).eval()


def build_sampling_pipeline(unet, noise_scheduler, kind: str = "ddim"):
    """A stock diffusers pipeline around ``unet``: DDIMPipeline (fast) or DDPMPipeline."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    if kind == "ddim":
        scheduler = DDIMScheduler.from_config(noise_scheduler.config, steps_offset=1)
        pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_chunks(unet, noise_scheduler, num_images: int, kind: str, steps: int, seed: int,
                  rank: int = 0, world_size: int = 1, chunk: int = 250) -> Dict[int, np.ndarray]:
    """Chunks ``i = rank, rank + W, ...`` of ``num_images`` samples as {i: (n, H, W, C) floats in
    [0, 1]}, chunk i drawn from a generator seeded by (seed, i): the images do not depend on how
    many ranks share the work."""
    pipe = build_sampling_pipeline(unet, noise_scheduler, kind)
    kwargs = {"num_inference_steps": steps} if kind == "ddim" else {}
    out = {}
    for index in range(rank, math.ceil(num_images / chunk), world_size):
        n = min(chunk, num_images - index * chunk)
        generator = derived_generator(seed, index)
        with torch.no_grad():
            out[index] = pipe(batch_size=n, generator=generator, output_type="np", **kwargs).images
    return out


def sample_images(unet, noise_scheduler, num_images: int, kind: str = "ddim", steps: int = 50,
                  seed: int = 0) -> np.ndarray:
    """``num_images`` samples as a float array (N, H, W, C) in [0, 1] (all chunks, in order)."""
    chunks = sample_chunks(unet, noise_scheduler, num_images, kind, steps, seed)
    return np.concatenate([chunks[i] for i in sorted(chunks)])


def generate(unet, noise_scheduler, eval_cfg, num_samples: Optional[int] = None) -> np.ndarray:
    """``num_samples`` (default eval.num_samples) images from ``unet`` with the eval sampler."""
    return sample_images(unet, noise_scheduler, num_samples or eval_cfg.num_samples,
                         eval_cfg.scheduler, eval_cfg.steps, eval_cfg.seed)


def export_pipeline(unet, noise_scheduler, out_dir: Path) -> None:
    """Save a stock ``DDPMPipeline`` folder (loads with ``DDPMPipeline.from_pretrained``)."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet.cpu(), scheduler=noise_scheduler).save_pretrained(str(out_dir))
