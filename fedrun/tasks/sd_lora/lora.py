"""The model layer of text-to-image fine-tuning: diffusers and peft live here.

Load a Stable Diffusion-style pipeline's parts through ``from_pretrained`` (hub id or local
folder), freeze them, attach LoRA to the U-Net's attention projections with diffusers' adapter
API (``unet.add_adapter(LoraConfig(...))``), export the LoRA weights in the diffusers format that
stock ``pipe.load_lora_weights`` reads, and the pure math of LoRA aggregation.

The federated state is the U-Net's *trainable* parameters (``models.FlatParameters``): with a
frozen base and LoRA attached that is exactly the LoRA state dict, so the one flat all-reduce of
pre-training carries it unchanged. In ``ffa`` mode the A matrices are frozen too and only B travels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Sequence

import numpy as np
import torch

from fedrun.errors import ConfigError

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class TextToImageParts:
    """The parts of a StableDiffusionPipeline that training needs."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler from the pipeline's scheduler config (training)


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_text_to_image(pretrained: str, device: torch.device, base_dtype: str = "float32") -> TextToImageParts:
    """Load U-Net, VAE, text encoder, tokenizer and scheduler of ``pretrained`` (local folder or
    hub id) exactly as ``StableDiffusionPipeline.from_pretrained`` would, each part frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if not pretrained:
        raise ConfigError("config key 'finetune.pretrained': a pipeline folder or hub id is required")
    path = Path(pretrained).expanduser()
    if path.exists():
        missing = [p for p in PIPELINE_PARTS if not (path / p).is_dir()]
        if missing:
            raise ConfigError(
                f"config key 'finetune.pretrained': '{pretrained}' is not a Stable Diffusion "
                f"pipeline folder: no {', '.join(p + '/' for p in missing)} subfolder "
                f"(expected {', '.join(p + '/' for p in PIPELINE_PARTS)})")
        source = str(path)
    else:
        source = pretrained
    dtype = _dtype(base_dtype)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        where = "the folder" if path.exists() else "the hub (or its cache; HF_HUB_OFFLINE?)"
        raise ConfigError(f"config key 'finetune.pretrained': cannot load '{pretrained}' from "
                          f"{where}: {str(exc).splitlines()[0]}") from None
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device)
    vae.eval()
    text_encoder.eval()
    return TextToImageParts(unet, vae, text_encoder, tokenizer, noise_scheduler)


def attach_lora(unet, rank: int, alpha: float | None, target_modules: Sequence[str], seed: int,
                freeze_a: bool = False) -> int:
    """Add a LoRA adapter to ``unet`` (base frozen); returns the number of LoRA parameters.

    The init is seeded: every rank (and every run with this seed) starts from the same A, so the
    shared A of ``ffa`` needs no broadcast. B starts at zero: round 0's model is the base model.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank,
                        init_lora_weights=True,
                        target_modules=list(target_modules))
    try:
        unet.add_adapter(config)
    except ValueError as exc:
        raise ConfigError(f"config key 'finetune.lora_target_modules': {exc}") from None
    count = 0
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # trainable weights in fp32 over a low-precision base
            count += param.numel()
            if freeze_a and ".lora_A." in name:
                param.requires_grad_(False)
    return count


def lora_modules(unet) -> List[tuple]:
    """(name, A weight, B weight) of every LoRA layer of ``unet``, in module order."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                out.append((name, module.lora_A[adapter].weight, module.lora_B[adapter].weight))
    return out


@dataclass
class LoraLayerView:
    """One LoRA layer of the U-Net: its factors (views of the federated vector when trainable),
    its frozen base weight and its scale alpha / rank (delta W = scale * B @ A)."""

    name: str
    a: torch.Tensor  # (rank, d_in)
    b: torch.Tensor  # (d_out, rank)
    base: torch.Tensor  # (d_out, d_in)
    scale: float


def lora_layers(unet) -> List[LoraLayerView]:
    """Every LoRA layer of ``unet`` with its base weight and scale, in module order (the order of
    ``lora_modules``)."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.lora_A:
                out.append(LoraLayerView(name, module.lora_A[adapter].weight.data,
                                         module.lora_B[adapter].weight.data,
                                         module.get_base_layer().weight.data,
                                         float(module.scaling[adapter])))
    return out


@torch.no_grad()
def lora_products(unet) -> torch.Tensor:
    """The flattened products B @ A of every LoRA layer, concatenated (fp32)."""
    return torch.cat([(b.float() @ a.float()).reshape(-1) for _, a, b in lora_modules(unet)])


def lora_product_numel(unet) -> int:
    return sum(b.shape[0] * a.shape[1] for _, a, b in lora_modules(unet))


def aggregation_error(mean_of_products: torch.Tensor, product_of_means: torch.Tensor) -> float:
    """||mean(B A) - mean(B) mean(A)|| / ||mean(B A)|| (Frobenius, over all LoRA layers)."""
    denominator = float(mean_of_products.double().norm())
    if denominator == 0.0:
        return 0.0
    return float((mean_of_products.double() - product_of_means.double()).norm()) / denominator


def base_parameter_count(unet) -> int:
    """Parameters of the U-Net without any adapter: what full-model FedAvg would exchange."""
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)


def lora_state_dict(unet) -> dict:
    """The adapter in the diffusers format (``unet.``-less peft names converted), fresh tensors."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # Fresh contiguous copies: the parameters are views of one flat vector, which safetensors
    # would refuse as shared memory.
    return {k: v.detach().float().clone().contiguous().cpu() for k, v in state.items()}


def save_lora(unet, out_dir: Path) -> Path:
    """``out_dir/pytorch_lora_weights.safetensors``, loadable by stock ``pipe.load_lora_weights``."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=lora_state_dict(unet),
                                              safe_serialization=True)
    return Path(out_dir) / LORA_WEIGHTS_FILE


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], device) -> torch.Tensor:
    """(P, L, D) text embeddings, tokenized as StableDiffusionPipeline does (pad to max length)."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0].float()


def build_pipeline(parts: TextToImageParts, unet=None):
    """A stock StableDiffusionPipeline of ``parts`` (DDIM sampler, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(parts.noise_scheduler.config, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder,
                                   tokenizer=parts.tokenizer, unet=parts.unet if unet is None else unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], num_per_prompt: int, steps: int, guidance_scale: float,
             seed: int) -> np.ndarray:
    """(len(prompts) * num_per_prompt, H, W, C) floats in [0, 1], prompt by prompt; prompt k's
    noise comes from seed + k, so grids of two models are directly comparable."""
    out = []
    for k, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + k)
        result = pipe([prompt] * num_per_prompt, num_inference_steps=steps,
                      guidance_scale=guidance_scale, generator=generator, output_type="np")
        out.append(result.images)
    return np.concatenate(out, axis=0)
