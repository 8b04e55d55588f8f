"""Tasks: one folder per kind of training (``ddpm``, ``sd_lora``, ``dit``), each registering a
``Task`` (``fedrun.tasks.base``) under its folder's name; ``task.name`` selects one. This package
imports no task: a task folder is imported when a config names it."""

from fedrun.tasks.base import Built, Task, TrainingData, build_task

__all__ = ["Built", "Task", "TrainingData", "build_task"]
