"""The DiT task's model: a diffusers ``DiTTransformer2DModel`` built from ``dit.*``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fedrun.tasks.dit.config import DiTConfig


def build_transformer(cfg: "DiTConfig", image_size: int, channels: int, seed: int):
    """A class-conditional ``DiTTransformer2DModel`` on ``channels`` x ``image_size`` pixels.

    ``out_channels = in_channels``: no learned variance, so ``.sample`` is the epsilon (or v / x0,
    ``diffusion.prediction_type``) prediction that ``diffusion_loss`` and a stock scheduler
    expect. ``num_embeds_ada_norm = num_classes``: diffusers adds the null class's row itself
    (index num_classes). Every rank builds it under the same seed, so all replicas start
    identical without a broadcast.
    """
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        patch_size=cfg.patch_size,
        num_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        attention_head_dim=cfg.attention_head_dim,
        num_embeds_ada_norm=cfg.num_classes,
    )
    return without_hidden_label_dropout(model)


def without_hidden_label_dropout(model):
    """Turn off the class dropout diffusers' ``LabelEmbedding`` does by itself in train mode.

    It draws with ``torch.rand`` from the process's global generator, which differs between
    ranks: a client would train differently depending on which rank runs it. The task drops
    labels to the null class in its loss instead, from the client's (seed, client, round)
    stream. The embedding table keeps its null-class row (it is sized at construction).
    """
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def null_class(model) -> int:
    """The class id of the null class: diffusers' extra embedding row, after the real classes."""
    return int(model.config.num_embeds_ada_norm)
