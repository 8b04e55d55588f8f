"""Unconditional DDPM pre-training (``task.name: ddpm``): the paper's first experiment."""

from fedrun.tasks.ddpm.task import DDPMTask

__all__ = ["DDPMTask"]
