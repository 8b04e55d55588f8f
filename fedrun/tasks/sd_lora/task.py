"""The fine-tuning task: federated LoRA on a Stable Diffusion-style text-to-image model, the
paper's second experiment (``task.name: sd_lora``, the task of ``fedrun finetune``; section
``finetune``).

Run by the same round loop as pre-training (``fedrun.engine.simulator``): same
cohorts, same dealing of clients to ranks, same flat round buffer and ONE all-reduce, same server
step, checkpoints and resume; ``fedrun central`` with a fine-tuning config
(``run_central(cfg, FinetuneTask(cfg))``) is the centralized LoRA baseline on all the images.
What this task adds:

* build: the pipeline's parts through ``from_pretrained``, all frozen; LoRA on the U-Net's
  attention projections (``finetune.mode: lora``) or the whole U-Net trainable (``full``: the
  text-conditioned pre-training of the CPU demo). The trainable parameters are the federated
  state: the LoRA A and B matrices, or B alone in ``ffa`` (A frozen at its shared seeded init).
* data: captioned images (a subject folder + instance prompt, or a prompts file), split among the
  clients. Latents are cached lazily per fixed chunk of 32 images, so a rank encodes only what
  its clients use and an image's latent does not depend on which rank encoded it; the prompts
  are encoded once.
* loss: SD's objective, epsilon-MSE on VAE latents (scaled by ``vae.config.scaling_factor``),
  conditioned on the prompt's text embeddings (optionally dropped for classifier-free guidance).
* per round: bytes of the LoRA state vs the full U-Net, and (``aggregation_error_every``) the
  aggregation error ||mean(B A) - mean(B) mean(A)|| / ||mean(B A)||. The clients' products are
  summed through an explicit second all-reduce on those rounds only: the metric is a simulator
  diagnostic that no real deployment would pay for, and it would make the round buffer
  U-Net-sized if it rode along.
* outputs: sample grids per validation prompt (``samples/base.png`` = base model, then
  ``samples/round_NNNNN.png``), ``final/pytorch_lora_weights.safetensors`` for stock
  ``pipe.load_lora_weights(final)`` (or a whole pipeline folder in ``full`` mode).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from fedrun.engine.run import is_due
from fedrun.errors import ConfigError
from fedrun.fl.aggregation.buffer import BYTES_PER_FLOAT
from fedrun.registry import TASKS
from fedrun.tasks.base import Built, Task
from fedrun.tasks.diffusion import diffusion_loss
from fedrun.tasks.sd_lora.config import FinetuneConfig
from fedrun.tasks.sd_lora.variants import VARIANTS, LoraVariant, check_variant_config

LATENT_CHUNK = 32  # images encoded together: fixed by index, never by rank


class LatentCache:
    """VAE posterior (mean, std) of each image, encoded on first use, chunk by chunk."""

    def __init__(self, vae, images, device: torch.device):
        self.vae = vae
        self.images = images
        self.device = device
        self.mean: Optional[torch.Tensor] = None
        self.std: Optional[torch.Tensor] = None
        self.done = np.zeros((len(images) + LATENT_CHUNK - 1) // LATENT_CHUNK, dtype=bool)

    @torch.no_grad()
    def _encode_chunk(self, chunk: int) -> None:
        start = chunk * LATENT_CHUNK
        idx = np.arange(start, min(start + LATENT_CHUNK, len(self.images)))
        pixels = self.images.get_batch(idx).to(self.device, self.vae.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        if self.mean is None:
            shape = (len(self.images), *posterior.mean.shape[1:])
            self.mean = torch.zeros(shape, device=self.device)
            self.std = torch.zeros(shape, device=self.device)
        self.mean[idx] = posterior.mean.float()
        self.std[idx] = posterior.std.float()
        self.done[chunk] = True

    def get(self, indices: np.ndarray) -> tuple:
        for chunk in np.unique(np.asarray(indices) // LATENT_CHUNK):
            if not self.done[chunk]:
                self._encode_chunk(int(chunk))
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=self.device)
        return self.mean[index], self.std[index]

    @property
    def encoded(self) -> int:
        return int(self.done.sum())


@TASKS.register("sd_lora")
class FinetuneTask(Task):
    config_sections = {"finetune": FinetuneConfig}

    @classmethod
    def check_config(cls, cfg) -> None:
        ft = cfg.finetune
        if not ft.pretrained:
            raise ConfigError("config key 'finetune.pretrained': a Stable Diffusion pipeline "
                              "folder or hub id is required")
        if cfg.data.name != "image_folder":
            raise ConfigError("config key 'data.name': the sd_lora task reads a folder of images; "
                              "set data.name=image_folder and data.root=<folder>")
        if not ft.instance_prompt and not ft.prompts_file:
            raise ConfigError("config key 'finetune.instance_prompt': set it (or finetune.prompts_file)")
        check_variant_config(cfg)

    def not_scorable(self, run_dir: Path) -> str:
        return (f"run '{run_dir}' is a '{self.name}' run (finetune.pretrained="
                f"'{self.ft.pretrained}'), and `fedrun sample` / `fedrun evaluate` score "
                "unconditional and class-conditional runs only. Its final/ holds LoRA weights for "
                "stock diffusers: pipe = StableDiffusionPipeline.from_pretrained(BASE); "
                "pipe.load_lora_weights(final/); its per-prompt sample grids are in samples/")

    def audit_subject(self, run_dir: Path, heldout: Optional[str]):
        from fedrun.tasks.sd_lora.audit import sd_lora_subject

        return sd_lora_subject(self, Path(run_dir), heldout)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ft = cfg.finetune
        self.parts = None
        self.lora_parameters = 0
        self.unet_parameters = 0
        self.initial_weights: Optional[torch.Tensor] = None
        self._products: Optional[torch.Tensor] = None
        self.variant: Optional[LoraVariant] = None  # mode 'lora': finetune.lora_aggregation's

    # ------------------------------------------------------------ build
    def build(self, device: torch.device) -> Built:
        from fedrun.data.captioned import build_captioned_images
        from fedrun.tasks.sd_lora.lora import (attach_lora, base_parameter_count, encode_prompts, load_text_to_image)

        cfg, ft = self.cfg, self.ft
        if device.type != "cuda" and ft.base_dtype != "float32":
            raise ConfigError(f"config key 'finetune.base_dtype': '{ft.base_dtype}' needs a GPU; "
                              "use float32 on CPU")
        dataset = build_captioned_images(cfg.data.root, cfg.data.image_size, cfg.data.grayscale,
                                         cfg.data.center_crop, ft.instance_prompt, ft.prompts_file)
        self.parts = parts = load_text_to_image(ft.pretrained, device, ft.base_dtype)
        unet = parts.unet
        if unet.config.in_channels != parts.vae.config.latent_channels:
            raise ConfigError(f"config key 'finetune.pretrained': the U-Net takes "
                              f"{unet.config.in_channels} channels, the VAE makes "
                              f"{parts.vae.config.latent_channels}")
        if parts.vae.config.in_channels != dataset.num_channels:
            raise ConfigError(f"config key 'data.grayscale': the VAE takes "
                              f"{parts.vae.config.in_channels} channels, the images have "
                              f"{dataset.num_channels}")
        self.unet_parameters = base_parameter_count(unet)
        if ft.mode == "lora":
            self.lora_parameters = attach_lora(unet, ft.lora_rank, ft.lora_alpha,
                                               ft.lora_target_modules, cfg.seed,
                                               freeze_a=ft.lora_aggregation == "ffa")
        else:
            if ft.base_dtype != "float32":
                raise ConfigError("config key 'finetune.base_dtype': mode 'full' trains the whole "
                                  "U-Net and needs float32")
            unet.requires_grad_(True)
        # Index 0 is the empty prompt (classifier-free guidance's unconditional embedding).
        self.prompts = ["", *dataset.prompts]
        self.latents = LatentCache(parts.vae, dataset, device)
        self.class_latents = None
        if ft.class_data_dir:  # DreamBooth prior preservation
            class_images = build_captioned_images(ft.class_data_dir, cfg.data.image_size,
                                                  cfg.data.grayscale, cfg.data.center_crop,
                                                  ft.class_prompt, ft.class_prompts_file)
            self.class_latents = LatentCache(parts.vae, class_images, device)
            self.prompts += [p for p in class_images.prompts if p not in self.prompts]
            self.class_prompt_ids = torch.as_tensor(
                [self.prompts.index(class_images.prompts[i]) for i in class_images.prompt_ids])
        self.text_embeddings = encode_prompts(parts.tokenizer, parts.text_encoder, self.prompts, device)
        return Built(dataset, unet, parts.noise_scheduler)

    def prepare(self, run) -> None:
        """The base model (B = 0) for the base.png grid; the prompt id of every image."""
        self.initial_weights = run.global_weights.detach().clone()
        self.device = run.device
        self.noise_scheduler = run.noise_scheduler
        self.prompt_ids = torch.as_tensor(run.dataset.prompt_ids + 1)  # +1: after the empty prompt
        if self.ft.mode == "lora":
            self.variant = VARIANTS[self.ft.lora_aggregation](self, run)

    def _latent_loss(self, model, cache, indices, ids, generator):
        mean, std = cache.get(indices)
        noise = torch.randn(mean.shape, generator=generator).to(self.device)
        latents = (mean + std * noise) * float(self.parts.vae.config.scaling_factor)
        if self.ft.prompt_dropout > 0:
            dropped = torch.rand(len(ids), generator=generator) < self.ft.prompt_dropout
            ids = torch.where(dropped, torch.zeros_like(ids), ids)
        context = self.text_embeddings[ids.to(self.device)]
        low_precision = self.device.type == "cuda" and self.ft.base_dtype != "float32"
        with torch.autocast(self.device.type, dtype=self.parts.unet.dtype, enabled=low_precision):
            return diffusion_loss(model, self.noise_scheduler, latents, generator,
                                  encoder_hidden_states=context)

    def loss(self, model, indices, generator):
        """SD's latent epsilon objective, text-conditioned (plus the prior-preservation loss)."""
        ids = self.prompt_ids[torch.as_tensor(np.asarray(indices, dtype=np.int64))]
        value = self._latent_loss(model, self.latents, indices, ids, generator)
        if self.class_latents is not None:  # as many class images as subject images
            drawn = torch.randint(len(self.class_latents.images), (len(ids),), generator=generator)
            value = value + self.ft.prior_loss_weight * self._latent_loss(
                model, self.class_latents, drawn.numpy(), self.class_prompt_ids[drawn], generator)
        return value

    def describe(self, fed) -> str:
        ft = self.ft
        ranks = (f" (client ranks {', '.join(map(str, sorted(set(self.variant.ranks))))})"
                 if self.variant is not None and len(set(self.variant.ranks)) > 1 else "")
        what = (f"LoRA r={ft.lora_rank}{ranks} on {','.join(ft.lora_target_modules)} "
                f"({ft.lora_aggregation}): {self._uplink_bytes(fed) / BYTES_PER_FLOAT:,.0f} of "
                f"{self.lora_parameters + self.unet_parameters:,} U-Net parameters travel"
                if ft.mode == "lora" else f"full U-Net ({self.unet_parameters:,} parameters)")
        prior = (f", prior preservation on {len(self.class_latents.images)} class images "
                 f"(weight {ft.prior_loss_weight})" if self.class_latents is not None else "")
        return f"{fed.dataset.describe()}{prior}, base '{ft.pretrained}', {what}"

    # ------------------------------------------------------------ the LoRA variant's hooks
    def keeps_client_state(self) -> bool:
        return self.ft.mode == "lora" and self.ft.lora_aggregation == "fedsa"

    def start_client(self, fed, client: int, global_round: int, state) -> None:
        if self.variant is not None:
            self.variant.start_client(fed, client, global_round, state)

    def finish_client(self, fed, client: int, weight: float, global_round: int):
        return self.variant.finish_client(fed, client, weight) if self.variant is not None else None

    def segments(self, fed) -> list:
        return self.variant.segments(fed) if self.variant is not None else []

    def server_step(self, fed, result) -> None:
        if self.variant is not None:
            self.variant.server_step(fed, result)

    def client_bytes(self, fed, client: int, result):
        return self.variant.client_bytes(fed, client, result) if self.variant is not None else None

    # ------------------------------------------------------------ per-round hooks
    def _error_due(self, global_round: int) -> bool:
        """The diagnostic applies where the server keeps averaged factors: fedavg, ffa, hetlora
        (flexlora and flora aggregate the products exactly; fedsa has no averaged B)."""
        every = self.ft.aggregation_error_every
        return (self.ft.mode == "lora" and self.ft.lora_aggregation in ("fedavg", "ffa", "hetlora")
                and every > 0 and is_due(every, global_round + 1, self.cfg.rounds))

    def observe_client(self, fed, client: int, weight: float, global_round: int) -> None:
        """After a client trained (its weights are in the replica): add n_c * B_c A_c."""
        from fedrun.tasks.sd_lora.lora import lora_product_numel, lora_products

        if not self._error_due(global_round):
            return
        if self._products is None:
            self._products = torch.zeros(lora_product_numel(fed.model), device=fed.device)
        self._products.add_(lora_products(fed.model) * weight)

    def round_metrics(self, fed, global_round: int, result) -> Dict[str, float]:
        """Bytes of LoRA vs full U-Net; the aggregation error (collective: every rank calls it)."""
        from fedrun.engine import dist
        from fedrun.tasks.sd_lora.lora import aggregation_error, lora_product_numel, lora_products

        full = self.unet_parameters * BYTES_PER_FLOAT
        metrics = {"bytes_full_unet_per_client": full,
                   "bytes_ratio_vs_full_unet": self._uplink_bytes(fed) / full}
        if not self._error_due(global_round):
            return metrics
        products = self._products
        if products is None:  # no client on this rank: contribute zeros
            products = torch.zeros(lora_product_numel(fed.model), device=fed.device)
        self._products = None
        dist.all_reduce_sum(products)  # explicit diagnostic reduction, logged below
        metrics["aggregation_error_reduce_bytes"] = products.numel() * BYTES_PER_FLOAT
        if result.total_weight > 0:
            # mean(B) and mean(A): the clients' weighted mean = global + mean update
            fed.params.load_(fed.global_weights + result.mean_update)
            metrics["lora_aggregation_error"] = aggregation_error(products / result.total_weight,
                                                                  lora_products(fed.model))
            fed.params.load_(fed.global_weights)
        return metrics

    def _uplink_bytes(self, fed) -> float:
        """What a client sends per round (the mean over the clients when their ranks differ)."""
        if self.variant is None:
            return fed.params.numel * BYTES_PER_FLOAT
        sizes = [self.variant.uplink_bytes(fed, c) for c in range(self.cfg.num_clients)]
        return sum(sizes) // len(sizes) if len(set(sizes)) == 1 else sum(sizes) / len(sizes)

    def summary(self, fed) -> Dict[str, float]:
        lora = self._uplink_bytes(fed)
        full = self.unet_parameters * BYTES_PER_FLOAT
        return {"federated_parameters": fed.params.numel, "bytes_per_client_round": lora,
                "bytes_full_unet_per_client_round": full, "bytes_ratio_vs_full_unet": lora / full}

    # ------------------------------------------------------------ samples and export
    def validation_prompts(self, fed) -> list:
        return list(self.ft.validation_prompts or
                    ([self.ft.instance_prompt] if self.ft.instance_prompt else fed.dataset.prompts[:8]))

    def generate(self, fed, weights: torch.Tensor, prompts, num_per_prompt: int) -> np.ndarray:
        """Samples of the model holding ``weights`` (the replica is restored afterwards)."""
        from fedrun.tasks.sd_lora.lora import build_pipeline, generate

        sample = self.cfg.sample
        fed.params.load_(weights)
        fed.model.eval()
        try:
            return generate(build_pipeline(self.parts, fed.model), prompts, num_per_prompt,
                            sample.steps, self.ft.guidance_scale, sample.seed)
        finally:
            fed.params.load_(fed.global_weights)

    def _model_weights(self, fed, weights: torch.Tensor) -> torch.Tensor:
        """The model the variant samples and exports (fedsa: the clients' mean B)."""
        return self.variant.model_weights(fed, weights) if self.variant is not None else weights

    def _base_model(self, fed):
        """The pretrained base in the replica (flora merges into it)."""
        return self.variant.base_model(fed) if self.variant is not None else contextlib.nullcontext()

    def write_samples(self, fed, done_rounds: int, logger) -> None:
        """One row per validation prompt: the base model once (base.png), then this round."""
        from fedrun.eval.images import save_grid

        prompts = self.validation_prompts(fed)
        per_prompt = self.cfg.sample.num_images
        samples = Path(self.cfg.output_dir) / "samples"
        if not (samples / "base.png").exists():
            with self._base_model(fed):
                images = self.generate(fed, self.initial_weights, prompts, per_prompt)
            grid = save_grid(images, samples / "base.png", columns=per_prompt)
            logger.image(done_rounds, "samples_base", grid, caption="base model: " + " | ".join(prompts))
        images = self.generate(fed, self._model_weights(fed, fed.ema.shadow), prompts, per_prompt)
        grid = save_grid(images, samples / f"round_{done_rounds:05d}.png", columns=per_prompt)
        logger.image(done_rounds, "samples", grid,
                     caption=f"after round {done_rounds}: " + " | ".join(prompts))

    def export(self, fed, out_dir: Path) -> None:
        """LoRA weights for stock ``load_lora_weights`` (or, mode 'full', a whole pipeline)."""
        from fedrun.tasks.sd_lora.lora import build_pipeline, save_lora
        from fedrun.tasks.diffusion import unet_with_weights

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.ft.mode == "lora":
            fed.params.load_(self.variant.export_weights(fed))
            save_lora(fed.model, out_dir)
            fed.params.load_(fed.global_weights)
            info = {"base": self.ft.pretrained, "rank": self.ft.lora_rank,
                    "alpha": self.ft.lora_alpha or self.ft.lora_rank,
                    "target_modules": list(self.ft.lora_target_modules),
                    "aggregation": self.ft.lora_aggregation, "rounds": self.cfg.rounds,
                    "client_ranks": self.variant.ranks}
            (out_dir / "fedrun_lora.json").write_text(json.dumps(info, indent=2) + "\n")
        else:
            unet = unet_with_weights(fed.model, fed.params, fed.ema.shadow).cpu()
            pipe = build_pipeline(self.parts, unet)
            pipe.scheduler = self.parts.noise_scheduler  # ship the training schedule
            pipe.save_pretrained(str(out_dir))
