"""What ``fedrun audit`` examines in a LoRA fine-tuning run: members = the subject images,
non-members = images of the same class it never saw (``--heldout DIR``), samples = the base
pipeline with final/'s LoRA loaded by stock ``load_lora_weights``, for the instance prompt;
per-image loss = SD's latent loss conditioned on that prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fedrun.errors import ConfigError, EvaluationError
from fedrun.tasks.base import AuditSubject


def sd_lora_subject(task, run_dir: Path, heldout: Optional[str]) -> AuditSubject:
    from fedrun.data import partition_indices
    from fedrun.data.captioned import build_captioned_images
    from fedrun.tasks.diffusion import diffusion_target
    from fedrun.tasks.sd_lora.lora import (build_pipeline, encode_prompts, load_text_to_image,
                                           generate as generate_images)

    cfg = task.cfg
    ft = cfg.finetune
    if heldout is None:
        raise ConfigError("audit --heldout: a fine-tuning run's non-members are images of the "
                          "subject's class that no client trained on; pass their folder")
    final = Path(run_dir) / "final"
    device = torch.device("cpu")
    prompt = ft.instance_prompt or (ft.validation_prompts[0] if ft.validation_prompts else None)
    if prompt is None:
        raise ConfigError("config key 'finetune.instance_prompt': the audit conditions on it")
    if ft.mode == "lora":
        if not (final / "pytorch_lora_weights.safetensors").is_file():
            raise EvaluationError(f"run '{run_dir}' has no final/pytorch_lora_weights.safetensors")
        parts = load_text_to_image(ft.pretrained, device)
        pipe = build_pipeline(parts)
        pipe.load_lora_weights(str(final))  # stock diffusers, as a user would
    else:
        parts = load_text_to_image(str(final), device)
        pipe = build_pipeline(parts)
    unet, vae, noise_scheduler = pipe.unet.eval(), pipe.vae, parts.noise_scheduler
    members = build_captioned_images(cfg.data.root, cfg.data.image_size, cfg.data.grayscale,
                                     cfg.data.center_crop, prompt, ft.prompts_file)
    outside = build_captioned_images(heldout, cfg.data.image_size, cfg.data.grayscale,
                                     cfg.data.center_crop, prompt, None)
    parts_ = partition_indices(members.labels, len(members), cfg.num_clients, cfg.partition, cfg.seed)
    clients = np.zeros(len(members), dtype=np.int64)
    for client, indices in enumerate(parts_):
        clients[indices] = client
    with torch.no_grad():
        context = encode_prompts(pipe.tokenizer, pipe.text_encoder, [prompt], device)
    scale = float(vae.config.scaling_factor)

    def generate(n: int, index: int) -> np.ndarray:
        return generate_images(pipe, [prompt], n, cfg.sample.steps, ft.guidance_scale,
                               cfg.eval.seed + 1000 * index)

    @torch.no_grad()
    def loss(images, generator, t):
        latents = vae.encode(images.to(vae.dtype)).latent_dist.mean.float() * scale
        noise = torch.randn(latents.shape, generator=generator)
        steps = torch.full((len(images),), t, dtype=torch.long)
        noisy = noise_scheduler.add_noise(latents, noise, steps)
        prediction = unet(noisy, steps, context.expand(len(images), -1, -1)).sample
        target = diffusion_target(noise_scheduler, latents, noise, steps)
        return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)

    return AuditSubject(task.name, members.images, clients, outside.images, generate, loss,
                        noise_scheduler.config.num_train_timesteps,
                        f"fine-tuning run ({ft.mode}, {ft.lora_aggregation}), prompt '{prompt}', "
                        f"{len(members)} subject images vs {len(outside)} held-out from '{heldout}'")
