"""Class-conditional sampling with classifier-free guidance, and the score of what it asked for.

diffusers' ``DiTPipeline`` is not used: it denoises *latents* and decodes them with its required
``vae`` (``vae.decode(latents / vae.config.scaling_factor)``), and it hard-codes the null class
of classifier-free guidance as ImageNet's id 1000 (``class_null = [1000] * batch``), which a
10-class model's embedding table does not have. This task denoises pixels and its null class is
``num_classes``. The loop below is the pipeline's own, on the stock scheduler: DDIM built from
the training schedule (as ``fedrun.tasks.diffusion.build_sampling_pipeline`` builds it) or the
training DDPM scheduler, ``scale_model_input`` / ``step``, and diffusers' image post-processing.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from fedrun.rng import derived_generator
from fedrun.tasks.dit.model import null_class


def sampling_scheduler(noise_scheduler, kind: str):
    """A fresh stock scheduler of the training schedule: DDIMScheduler ('ddim') or the
    DDPMScheduler itself ('ddpm'); fresh because ``set_timesteps`` makes a scheduler stateful."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddim":
        return DDIMScheduler.from_config(noise_scheduler.config, steps_offset=1)
    return DDPMScheduler.from_config(noise_scheduler.config)


def guided_prediction(transformer, noisy: torch.Tensor, timestep: torch.Tensor,
                      labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The model output for ``labels``, pushed away from the null class's by ``guidance_scale``
    (one batched pass over [class, null]); scale 1 is the plain conditional prediction."""
    n = len(noisy)
    if guidance_scale == 1.0:
        return transformer(noisy, timestep.expand(n), class_labels=labels).sample
    null = torch.full_like(labels, null_class(transformer))
    both = transformer(torch.cat([noisy, noisy]), timestep.expand(2 * n),
                       class_labels=torch.cat([labels, null])).sample
    conditional, unconditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


@torch.no_grad()
def sample_classes(transformer, noise_scheduler, labels: torch.Tensor, kind: str, steps: int,
                   guidance_scale: float, generator: torch.Generator) -> np.ndarray:
    """One image per entry of ``labels``: (N, H, W, C) floats in [0, 1]; the initial noise and
    DDPM's step noise come from ``generator``."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor

    config, device = transformer.config, transformer.device
    scheduler = sampling_scheduler(noise_scheduler, kind)
    scheduler.set_timesteps(steps if kind == "ddim" else scheduler.config.num_train_timesteps)
    shape = (len(labels), config.in_channels, config.sample_size, config.sample_size)
    images = randn_tensor(shape, generator=generator, device=device, dtype=transformer.dtype)
    images = images * scheduler.init_noise_sigma
    labels = labels.to(device)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(images, t)
        prediction = guided_prediction(transformer, model_input, t.to(device), labels, guidance_scale)
        images = scheduler.step(prediction, t, images, generator=generator).prev_sample
    return VaeImageProcessor().postprocess(images, output_type="np")


def requested_labels(start: int, n: int, num_classes: int) -> np.ndarray:
    """The labels of samples ``start .. start + n - 1`` of a run's sample set: i mod num_classes,
    so every class is asked for equally often and a chunk's labels follow from its position."""
    return (np.arange(start, start + n) % num_classes).astype(np.int64)


def class_draw(transformer, noise_scheduler, kind: str, steps: int, guidance_scale: float,
               seed: int):
    """``draw(n, index)`` of ``fedrun.eval.sampling``: chunk ``index`` of the sample set, its
    labels from its position and its noise from (seed, index), so it does not depend on which
    rank draws it or how many ranks share the chunks."""
    from fedrun.eval.sampling import CHUNK

    num_classes = null_class(transformer)

    def draw(n: int, index: int):
        labels = requested_labels(index * CHUNK, n, num_classes)
        images = sample_classes(transformer, noise_scheduler, torch.from_numpy(labels), kind,
                                steps, guidance_scale, derived_generator(seed, index))
        return images, labels

    return draw


def class_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels of a grid with one row per class: 0 x per_class, 1 x per_class, ..."""
    return torch.arange(num_classes).repeat_interleave(per_class)


# ---------------------------------------------------------------- scores

@torch.no_grad()
def predicted_classes(classifier, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The digits classifier's class of each image ((N, H, W, C) in [0, 1])."""
    from fedrun.eval.features import to_model_range

    pixels = to_model_range(images)
    return torch.cat([classifier.predict(pixels[i: i + batch_size])
                      for i in range(0, len(pixels), batch_size)]).numpy()


def label_accuracy(predicted: np.ndarray, requested: np.ndarray,
                   num_classes: int) -> Dict[str, object]:
    """How often the classifier reads back the requested label: overall and per class (None
    for a class that was not requested)."""
    correct = np.asarray(predicted) == np.asarray(requested)
    per_class: List[Optional[float]] = []
    for k in range(num_classes):
        asked = np.asarray(requested) == k
        per_class.append(round(float(correct[asked].mean()), 4) if asked.any() else None)
    return {"label_accuracy": float(correct.mean()), "label_accuracy_per_class": per_class}
