"""Federated LoRA fine-tuning of a Stable Diffusion-style pipeline (``task.name: sd_lora``, the
task of ``fedrun finetune``): the paper's second experiment."""

from fedrun.tasks.sd_lora.task import FinetuneTask

__all__ = ["FinetuneTask"]
