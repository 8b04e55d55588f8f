"""The DDPM task's config section: ``model`` (the diffusers UNet2DModel)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from fedrun.errors import ConfigError


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


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
    lora_rank: Optional[int] = None
    """Fine-tune the pretrained U-Net (``model.pretrained``) with LoRA of this rank (peft): its
    weights stay frozen and only the LoRA weights train, travel and are averaged; ``final/`` is
    a stock DDPMPipeline with them merged. null = train every weight."""
    lora_alpha: Optional[float] = None
    """LoRA's alpha (the update is scaled by alpha / rank); null = the rank (scale 1)."""
    lora_target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """The U-Net's layers LoRA attaches to (peft ``target_modules``): the attention projections
    by default; add e.g. 'conv1', 'conv2' for the ResNet blocks' convolutions."""

    def __post_init__(self) -> None:
        _require(self.lora_rank is None or self.lora_rank >= 1, "model.lora_rank",
                 f"must be >= 1 (or null: no LoRA), got {self.lora_rank}")
        _require(self.lora_alpha is None or self.lora_alpha > 0, "model.lora_alpha",
                 f"must be > 0, got {self.lora_alpha}")
        n = len(self.block_out_channels)
        _require(n >= 1, "model.block_out_channels", "needs at least one entry")
        _require(len(self.down_block_types) == n, "model.down_block_types",
                 f"needs {n} entries (one per model.block_out_channels), got {len(self.down_block_types)}")
        _require(len(self.up_block_types) == n, "model.up_block_types",
                 f"needs {n} entries (one per model.block_out_channels), got {len(self.up_block_types)}")
        for c in self.block_out_channels:
            _require(c % self.norm_num_groups == 0, "model.block_out_channels",
                     f"{c} is not divisible by model.norm_num_groups={self.norm_num_groups}")
