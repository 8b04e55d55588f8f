"""A small Stable Diffusion (text-to-image latent diffusion) built locally, nothing downloaded.

The CPU-scale stand-in for Stable Diffusion 1.5 in the federated LoRA experiment: the same
diffusers/transformers classes (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
``CLIPTokenizer``, ``DDPMScheduler``) in a ``StableDiffusionPipeline`` folder, so that fine-tuning
loads it through the very ``from_pretrained`` path a real checkpoint takes. Only the sizes differ.

* Tokenizer: a word-level CLIP BPE made from a small word list (every word is one token; BPE
  merges spell each word out letter by letter, letters alone remain in the vocabulary).
* Text encoder: a 2-layer CLIP text transformer, randomly initialised (unit-variance token
  embeddings, so that distinct words stay distinct) and kept frozen, as CLIP is frozen in
  Stable Diffusion training.
* VAE: a small ``AutoencoderKL`` (16x16x1 -> 8x8x4) trained here for reconstruction, with
  ``scaling_factor`` set from the latents' standard deviation, as SD's VAE has it.
* U-Net: a small ``UNet2DConditionModel`` with cross-attention on the text embeddings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Sequence

import torch
import torch.nn.functional as F

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Words of the demo's prompts ("a photo of the digit three", "a photo of sks digit").
DEFAULT_WORDS = ("a", "photo", "of", "the", "digit", *DIGIT_WORDS, "sks")
MAX_PROMPT_TOKENS = 12


def build_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = MAX_PROMPT_TOKENS):
    """A ``CLIPTokenizer`` in which each of ``words`` (lowercase letters) is a single token."""
    from transformers import CLIPTokenizer

    vocab: dict = {}
    merges: List[tuple] = []

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for token in SPECIAL_TOKENS:
        add(token)
    for letter in LETTERS:
        add(letter)
        add(letter + "</w>")
    for word in words:
        if not word or any(ch not in LETTERS for ch in word):
            raise ValueError(f"tokenizer words must be lowercase letters, got '{word}'")
        symbols = list(word[:-1]) + [word[-1] + "</w>"]  # CLIP's BPE marks the end of a word
        current = symbols[0]
        for symbol in symbols[1:]:
            if (current, symbol) not in merges:
                merges.append((current, symbol))
            current += symbol
            add(current)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length,
                              pad_token="<|endoftext|>")
    for word in words:  # the merges of one word must not break another (checked, not assumed)
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"word '{word}' tokenizes into {len(ids)} tokens")
    return tokenizer


def build_text_encoder(tokenizer, hidden_size: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=hidden_size)
    model = CLIPTextModel(config).eval()
    # A trained CLIP tells words apart; a random one with CLIP's std-0.02 token embeddings maps
    # "... digit three" and "... digit seven" to 98 %-similar outputs (cosine), which a small
    # U-Net struggles to condition on. Unit-variance token embeddings keep each word distinct.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
    return model


def build_vae(channels: int = 1, image_size: int = 16, latent_channels: int = 4, seed: int = 0):
    """A small AutoencoderKL with one downsampling: image_size -> image_size / 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=channels, out_channels=channels, sample_size=image_size,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=8)


def build_unet(latent_size: int = 8, latent_channels: int = 4, cross_attention_dim: int = 32,
               block_out_channels: Sequence[int] = (32, 64), seed: int = 0):
    """A small text-conditional U-Net (cross-attention in every block)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    n = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8)


def build_noise_scheduler():
    """Stable Diffusion's training schedule (scaled-linear betas 0.00085..0.012, T = 1000)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon",
                         clip_sample=False, steps_offset=1)


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler):
    """A ``StableDiffusionPipeline`` of the given parts (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(out_dir: Path, words: Iterable[str] = DEFAULT_WORDS, vae=None,
                        block_out_channels: Sequence[int] = (32, 64), seed: int = 0,
                        image_size: int = 16, channels: int = 1) -> Path:
    """Save a complete tiny StableDiffusionPipeline folder (U-Net randomly initialised)."""
    tokenizer = build_tokenizer(words)
    text_encoder = build_text_encoder(tokenizer, seed=seed)
    vae = vae if vae is not None else build_vae(channels, image_size, seed=seed)
    latent_size = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    unet = build_unet(latent_size, vae.config.latent_channels, text_encoder.config.hidden_size,
                      block_out_channels, seed=seed)
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer, build_noise_scheduler())
    pipe.save_pretrained(str(out_dir))
    return Path(out_dir)


def train_vae(images: torch.Tensor, steps: int = 400, batch_size: int = 32, lr: float = 2e-3,
              kl_weight: float = 1e-6, seed: int = 0, log=None):
    """Train ``build_vae`` to reconstruct ``images`` ((N, C, S, S) in [-1, 1]); sets
    ``scaling_factor`` = 1 / std(latents) so that scaled latents have unit variance, as in SD."""
    vae = build_vae(images.shape[1], images.shape[-1], seed=seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    vae.train()
    for step in range(steps):
        batch = images[torch.randint(0, len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log is not None and (step + 1) % 100 == 0:
            log(f"vae step {step + 1}/{steps}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(images[:512]).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae
