"""The model module owns diffusers: U-Net and scheduler construction, the flat view of the
federated parameters, sampling pipelines and export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

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


def build_noise_scheduler(cfg: DiffusionConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
    )


class FlatParameters:
    """The trainable parameters of a module, re-seated as views of ONE contiguous fp32 vector.

    Reading the local model (``flat``) and resetting it to the global weights (``load_``) are then
    single memory copies, and the vector is exactly what the all-reduce buffer carries.
    """

    def __init__(self, module: torch.nn.Module):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.names: List[str] = [n for n, _ in named]
        self.shapes: List[torch.Size] = [p.shape for _, p in named]
        self.params: List[torch.nn.Parameter] = [p for _, p in named]
        numel = sum(p.numel() for p in self.params)
        self.flat = torch.empty(numel, dtype=torch.float32, device=self.params[0].device)
        offset = 0
        for param in self.params:
            n = param.numel()
            self.flat[offset: offset + n].copy_(param.data.reshape(-1))
            param.data = self.flat[offset: offset + n].view_as(param)
            offset += n

    @property
    def numel(self) -> int:
        return self.flat.numel()

    def load_(self, vector: torch.Tensor) -> None:
        """Copy ``vector`` into the parameters (a copy: the caller's vector is never aliased)."""
        self.flat.copy_(vector)

    def state_dict(self, vector: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Name -> tensor for ``vector`` (default: the current parameters); fresh, unshared storage."""
        vector = self.flat if vector is None else vector
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes):
            n = shape.numel()
            out[name] = vector[offset: offset + n].detach().reshape(shape).clone().cpu()
            offset += n
        return out

    def vector_from(self, state: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat vector for a name -> tensor mapping (checks names and shapes)."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"{len(missing)} parameters missing, e.g. '{missing[0]}'")
        parts = []
        for name, shape in zip(self.names, self.shapes):
            if state[name].shape != shape:
                raise ValueError(f"parameter '{name}' has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(shape)}")
            parts.append(state[name].reshape(-1).float())
        return torch.cat(parts).to(self.flat.device)


def unet_with_weights(unet, flat: FlatParameters, vector: torch.Tensor):
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

    import numpy as np

    pipe = build_sampling_pipeline(unet, noise_scheduler, kind)
    kwargs = {"num_inference_steps": steps} if kind == "ddim" else {}
    out = {}
    for index in range(rank, math.ceil(num_images / chunk), world_size):
        n = min(chunk, num_images - index * chunk)
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
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
