"""Local training of one client: E optimizer steps of the DDPM loss from the global weights.

No distributed code here. Everything random a client does (batch order, noise, timesteps) comes
from a generator seeded by (seed, client, round), so the client trains identically whichever
rank runs it: this is what makes results independent of the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedrun.config import OptimConfig


def client_generator(seed: int, client: int, global_round: int) -> torch.Generator:
    """The client's private random stream for one round."""
    state = np.random.SeedSequence([seed, client, global_round]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def num_local_steps(num_samples: int, batch_size: int, local_steps: int,
                    local_epochs: float | None) -> int:
    """E, or ceil(epochs * n / B) when the budget is given in local epochs."""
    if local_epochs is None:
        return local_steps
    return max(1, math.ceil(local_epochs * num_samples / batch_size))


def batch_indices(client_indices: np.ndarray, steps: int, batch_size: int,
                  generator: torch.Generator) -> np.ndarray:
    """(steps, batch) sample indices: passes over the client's data in shuffled order, reshuffled
    at each pass, wrapping around as often as needed (also when the client has fewer samples
    than one batch)."""
    needed = steps * batch_size
    passes = math.ceil(needed / len(client_indices))
    order = torch.cat([torch.randperm(len(client_indices), generator=generator) for _ in range(passes)])
    return client_indices[order[:needed].numpy()].reshape(steps, batch_size)


@dataclass
class ClientResult:
    mean_loss: float
    samples: int  # samples processed (steps x batch)


def diffusion_loss(unet, noise_scheduler, images: torch.Tensor, generator: torch.Generator | None,
                   noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                   encoder_hidden_states: torch.Tensor | None = None):
    """The DDPM objective: MSE between the added noise (or v / x0) and the U-Net's prediction.

    Noise and timesteps are drawn from ``generator`` unless given (the centralized baseline
    draws them for the global batch and passes each rank its slice). ``images`` may be VAE
    latents; ``encoder_hidden_states`` conditions a text-to-image U-Net."""
    batch = images.shape[0]
    if noise is None:
        noise = torch.randn(images.shape, generator=generator)
    if timesteps is None:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,),
                                  generator=generator)
    noise, timesteps = noise.to(images.device), timesteps.to(images.device)
    noisy = noise_scheduler.add_noise(images, noise, timesteps)
    if encoder_hidden_states is None:
        prediction = unet(noisy, timesteps).sample
    else:
        prediction = unet(noisy, timesteps, encoder_hidden_states).sample
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(images, noise, timesteps)
    else:
        target = images
    return F.mse_loss(prediction.float(), target.float())


def train_client(model, params, loss_fn, batches: np.ndarray, generator: torch.Generator,
                 optim: OptimConfig, device: torch.device) -> ClientResult:
    """Run one optimizer step per row of ``batches`` on ``model`` (already holding the global
    weights); ``loss_fn(batch_indices, generator)`` is the task's loss. A fresh AdamW per call:
    client optimizer state does not persist across rounds."""
    optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                  weight_decay=optim.weight_decay)
    model.train()
    loss_sum = torch.zeros((), device=device)
    for step_indices in batches:
        loss = loss_fn(step_indices, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        optimizer.step()
        loss_sum += loss.detach()
    # One host sync per client, not per step.
    return ClientResult(mean_loss=float(loss_sum) / len(batches), samples=int(batches.size))
