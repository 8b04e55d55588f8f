"""What ``fedrun audit`` examines in a DDPM pre-training run: members = the training split,
non-members = the held-out split, samples = the exported EMA model's DDIM samples, per-image
loss = the DDPM objective at a fixed timestep with fixed noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedrun.errors import EvaluationError
from fedrun.eval.audit import AUDIT_CHUNK
from fedrun.tasks.base import AuditSubject


def ddpm_subject(task, run_dir: Path) -> AuditSubject:
    from fedrun.data import build_datasets, partition_indices
    from fedrun.tasks.diffusion import diffusion_target, sample_chunks

    cfg = task.cfg
    unet, noise_scheduler, label = task.load_model(run_dir)
    train, heldout = build_datasets(cfg.data, cfg.seed)
    if len(heldout) < 2:
        raise EvaluationError(f"run '{run_dir}' has {len(heldout)} held-out images: the audit needs "
                              "non-members (data.heldout_fraction > 0)")
    parts = partition_indices(train.labels, len(train), cfg.num_clients, cfg.partition, cfg.seed)
    clients = np.zeros(len(train), dtype=np.int64)
    for client, indices in enumerate(parts):
        clients[indices] = client
    e = cfg.eval

    def generate(n: int, index: int) -> np.ndarray:
        # chunk ``index`` of eval.seed's chunks (seeded by (eval.seed, index), as `fedrun sample`)
        chunks = sample_chunks(unet, noise_scheduler, index * AUDIT_CHUNK + n, e.scheduler, e.steps,
                               e.seed, rank=index, world_size=index + 1, chunk=AUDIT_CHUNK)
        return chunks[index]

    @torch.no_grad()
    def loss(images, generator, t):
        noise = torch.randn(images.shape, generator=generator)
        steps = torch.full((len(images),), t, dtype=torch.long)
        noisy = noise_scheduler.add_noise(images, noise, steps)
        prediction = unet(noisy, steps).sample
        target = diffusion_target(noise_scheduler, images, noise, steps)
        return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)

    everything = lambda data: data.get_batch(np.arange(len(data)))  # noqa: E731
    return AuditSubject(task.name, everything(train), clients, everything(heldout), generate, loss,
                        noise_scheduler.config.num_train_timesteps,
                        f"pre-training run, model {label}, {len(train)} training / {len(heldout)} "
                        "held-out images")
