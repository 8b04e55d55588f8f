"""The model module owns diffusers: U-Net and scheduler construction, the diffusion loss,
sampling pipelines and export.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedrun.config import DiffusionConfig, ModelConfig
from fedrun.errors import ConfigError


def build_unet(cfg: ModelConfig, image_size: int, channels: int, seed: int):
    """A diffusers ``UNet2DModel``: loaded from ``cfg.pretrained`` or built from the config.

    Every rank builds it under the same seed, so all replicas start identical without a broadcast.
    """
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    if cfg.pretrained:
        unet = _load_pretrained_unet(cfg.pretrained)
    else:
        unet = UNet2DModel(
            sample_size=image_size,
            in_channels=channels,
            out_channels=channels,
            layers_per_block=cfg.layers_per_block,
            block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=tuple(cfg.down_block_types),
            up_block_types=tuple(cfg.up_block_types),
            norm_num_groups=cfg.norm_num_groups,
            attention_head_dim=cfg.attention_head_dim,
        )
    if unet.config.in_channels != channels:
        raise ConfigError(
            f"config key 'model.pretrained': the U-Net takes {unet.config.in_channels} channels "
            f"but the data has {channels} (set data.grayscale accordingly)")
    return unet


def _load_pretrained_unet(name: str):
    from diffusers import UNet2DModel

    path = Path(name)
    if path.exists():
        if (path / "unet" / "config.json").is_file():
            return UNet2DModel.from_pretrained(path, subfolder="unet")
        if (path / "config.json").is_file():
            return UNet2DModel.from_pretrained(path)
        raise ConfigError(f"config key 'model.pretrained': '{name}' holds neither config.json "
                          "nor unet/config.json (a UNet2DModel or DDPMPipeline folder)")
    try:  # a hub id: a pipeline repo keeps the U-Net in a subfolder
        return UNet2DModel.from_pretrained(name, subfolder="unet")
    except Exception:
        try:
            return UNet2DModel.from_pretrained(name)
        except Exception as exc:
            raise ConfigError(f"config key 'model.pretrained': cannot load '{name}' "
                              f"(not a local folder, and the hub said: {exc})") from None


def diffusion_loss(unet, noise_scheduler, images: torch.Tensor, generator: torch.Generator | None,
                   encoder_hidden_states: torch.Tensor | None = None):
    """The DDPM objective: MSE between the added noise (or v / x0) and the U-Net's prediction.

    Noise and timesteps are drawn from ``generator``, the caller's seeded stream (a client's
    (seed, client, round) or a centralized micro-batch's (seed, step, offset)). ``images`` may
    be VAE latents; ``encoder_hidden_states`` conditions a text-to-image U-Net."""
    import torch.nn.functional as F

    batch = images.shape[0]
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,),
                              generator=generator).to(images.device)
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    if encoder_hidden_states is None:
        prediction = unet(noisy, timesteps).sample
    else:
        prediction = unet(noisy, timesteps, encoder_hidden_states).sample
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(images, noise, timesteps)
    else:
        target = images
    return F.mse_loss(prediction.float(), target.float())


def build_noise_scheduler(cfg: DiffusionConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


def unet_with_weights(unet, flat, vector: torch.Tensor):
    """A separate U-Net (same config) holding ``vector``: for sampling and export, leaving the
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
                  rank: int = 0, world_size: int = 1, chunk: int = 250):
    """Chunks ``i = rank, rank + W, ...`` of ``num_images`` samples as {i: (n, H, W, C) floats in
    [0, 1]}, chunk i drawn from a generator seeded by (seed, i): the images do not depend on how
    many ranks share the work."""
    import math

    from fedrun.rng import derived_generator

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
                  seed: int = 0):
    """``num_images`` samples as a float array (N, H, W, C) in [0, 1] (all chunks, in order)."""
    import numpy as np

    chunks = sample_chunks(unet, noise_scheduler, num_images, kind, steps, seed)
    return np.concatenate([chunks[i] for i in sorted(chunks)])


def export_pipeline(unet, noise_scheduler, out_dir: Path) -> None:
    """Save a stock ``DDPMPipeline`` folder (loads with ``DDPMPipeline.from_pretrained``)."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet.cpu(), scheduler=noise_scheduler).save_pretrained(str(out_dir))
