"""fedrun: a multi-process torch.distributed simulator for federated training of diffusion models."""

__version__ = "0.1.0"
