"""The DiT task's config section: ``dit`` (the diffusers DiTTransformer2DModel, its class
conditioning and classifier-free guidance). The noise schedule is the shared ``diffusion``
section (``fedrun.tasks.diffusion.DiffusionConfig``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedrun.errors import ConfigError


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")


@dataclass
class DiTConfig:
    """A class-conditional ``DiTTransformer2DModel`` in pixel space; the defaults (2 blocks of
    width 32, 2x2 patches) train a round in well under a second on one CPU thread at 8x8 or
    16x16 digits."""

    patch_size: int = 2
    """Side of the square patches the image is cut into (one token each); data.image_size must
    be a multiple of it. Tokens = (image_size / patch_size)^2."""
    num_layers: int = 2
    """Transformer blocks (DiT-S has 12)."""
    num_attention_heads: int = 2
    """Attention heads per block."""
    attention_head_dim: int = 16
    """Channels per head; the model width is num_attention_heads * attention_head_dim, which the
    2-d sin-cos position embedding needs to be a multiple of 4."""
    num_classes: int = 10
    """Classes of the data's labels (10 for the digits), the model's ``num_embeds_ada_norm``.
    diffusers' class embedding table has one row more: index num_classes is the null class
    of classifier-free guidance (as DiT-XL-2's 1000 ImageNet classes use index 1000)."""
    class_dropout: float = 0.1
    """Probability that a training sample is shown with the null class instead of its label
    (drawn from the client's (seed, client, round) stream), so that the model also learns the
    unconditional prediction that classifier-free guidance needs. 0 = no null class training."""
    guidance_scale: float = 2.0
    """Classifier-free guidance of the samples: eps = eps_null + s * (eps_class - eps_null);
    1 = plain conditional sampling (no null-class pass). Needs class_dropout > 0 above 1."""

    def __post_init__(self) -> None:
        for key in ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim"):
            _require(getattr(self, key) >= 1, f"dit.{key}", f"must be >= 1, got {getattr(self, key)}")
        width = self.num_attention_heads * self.attention_head_dim
        _require(width % 4 == 0, "dit.attention_head_dim",
                 f"the model width num_attention_heads * attention_head_dim = {width} must be a "
                 "multiple of 4 (the 2-d sin-cos position embedding splits it in four)")
        _require(self.num_classes >= 2, "dit.num_classes", f"must be >= 2, got {self.num_classes}")
        _require(0.0 <= self.class_dropout < 1.0, "dit.class_dropout",
                 f"must be in [0, 1), got {self.class_dropout}")
        _require(self.guidance_scale >= 1.0, "dit.guidance_scale",
                 f"must be >= 1 (1 = no guidance), got {self.guidance_scale}")
        _require(self.guidance_scale == 1.0 or self.class_dropout > 0, "dit.guidance_scale",
                 f"{self.guidance_scale} guides with the null class, which dit.class_dropout=0 never "
                 "trains; set dit.class_dropout > 0 (e.g. 0.1) or dit.guidance_scale=1")
