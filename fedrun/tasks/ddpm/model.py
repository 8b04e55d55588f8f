"""The DDPM task's model: a diffusers ``UNet2DModel``, built from ``model.*`` or loaded."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from fedrun.errors import ConfigError

if TYPE_CHECKING:
    from fedrun.tasks.ddpm.config import ModelConfig


def build_unet(cfg: "ModelConfig", image_size: int, channels: Optional[int], seed: int):
    """A diffusers ``UNet2DModel``: loaded from ``cfg.pretrained`` or built from the config
    (``channels`` None: a pretrained U-Net's own, unchecked).

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
    if channels is not None and unet.config.in_channels != channels:
        raise ConfigError(
            f"config key 'model.pretrained': the U-Net takes {unet.config.in_channels} channels "
            f"but the data has {channels} (set data.grayscale accordingly)")
    if cfg.lora_rank:
        attach_lora(unet, cfg)  # after the seed: A's initialisation is the same on every rank
    return unet


def attach_lora(unet, cfg: "ModelConfig") -> None:
    """Freeze ``unet`` and inject LoRA of ``cfg.lora_rank`` into ``cfg.lora_target_modules``
    (peft; B starts at zero, so the model starts as the pretrained one)."""
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                        target_modules=list(cfg.lora_target_modules), init_lora_weights=True)
    try:
        inject_adapter_in_model(config, unet)
    except ValueError as exc:
        raise ConfigError(f"config key 'model.lora_target_modules': {list(cfg.lora_target_modules)}: "
                          f"{str(exc).splitlines()[0]}") from None


def merged_unet(unet):
    """``unet`` itself (changed in place: pass a copy to keep the LoRA model) with its LoRA
    weights merged into the base layers and the LoRA layers removed: a plain UNet2DModel that
    stock diffusers saves and loads."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(unet.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())
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
