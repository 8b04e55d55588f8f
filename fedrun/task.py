"""The task contract: what the generic run frame needs from a kind of training.

A task (DDPM pre-training, LoRA fine-tuning, ...) builds the data and the model, defines the loss
of one batch, draws samples, evaluates and exports. The federated round loop
(``fedrun.simulator``), the centralized baseline (``fedrun.centralized``), ``fedrun sample`` and
``fedrun evaluate`` all talk to a task through this class and nothing else: the engine never
imports a concrete task (they are found through ``TASKS``), and never probes one with
``hasattr``. Optional hooks have no-op defaults, so a new task implements the five abstract
methods and overrides only what it needs (torchtitan's ``TrainSpec`` plays the same role).

The federated state is always the trainable parameters of ``Built.model``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Protocol

import numpy as np
import torch

from fedrun.registry import Registry

if TYPE_CHECKING:  # imported for annotations only: the frame imports this module
    from fedrun.aggregate import RoundResult
    from fedrun.config import Config
    from fedrun.frame import RunState
    from fedrun.logging import RunLogger


class TrainingData(Protocol):
    """What the frame needs of a data set: its size, batches by index, labels (or None)."""

    labels: Optional[np.ndarray]

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> Any: ...


@dataclass
class Built:
    """What a task builds for the frame."""

    dataset: TrainingData
    model: torch.nn.Module  # its trainable parameters are the federated state
    noise_scheduler: Any  # a diffusers scheduler (the training noise schedule)


TASKS: Registry = Registry("task", "task")


class Task(abc.ABC):
    """Base class of every task; ``name`` is set by ``@TASKS.register``."""

    name: str = "task"

    def __init__(self, cfg: "Config"):
        self.cfg = cfg

    # ------------------------------------------------------------ required
    @abc.abstractmethod
    def build(self, device: torch.device) -> Built:
        """Data, model (trainable parameters = federated state) and noise schedule, on ``device``.
        Every rank builds the same model from the same seed: no broadcast is needed."""

    @abc.abstractmethod
    def loss(self, model: torch.nn.Module, indices: np.ndarray,
             generator: torch.Generator) -> torch.Tensor:
        """Mean loss of the samples ``indices`` through ``model`` (the replica, or its DDP wrapper
        in the centralized baseline); all randomness (noise, timesteps, dropout) from
        ``generator``."""

    @abc.abstractmethod
    def describe(self, run: "RunState") -> str:
        """One line for the start of the log: data and model."""

    @abc.abstractmethod
    def write_samples(self, run: "RunState", done_rounds: int, logger: "RunLogger") -> None:
        """samples/round_NNNNN.png of the EMA model (rank 0)."""

    @abc.abstractmethod
    def export(self, run: "RunState", out_dir: Path) -> None:
        """final/: a folder stock diffusers loads (a pipeline, or LoRA weights)."""

    # ------------------------------------------------------------ optional hooks
    def prepare(self, run: "RunState") -> None:
        """Called once the run state exists (before any round or restore)."""

    def observe_client(self, run: "RunState", client: int, weight: float, global_round: int) -> None:
        """After a client's accepted update, with the client's weights still in the replica."""

    def round_metrics(self, run: "RunState", global_round: int, result: "RoundResult") -> Dict[str, Any]:
        """Extra metrics of a reduced federated round, before the server step. Called on every
        rank (it may run a collective, the same on every rank)."""
        return {}

    def summary(self, run: "RunState") -> Dict[str, Any]:
        """Extra keys for the run summary (rank 0, at the end)."""
        return {}

    #: Whether ``evaluate`` scores the EMA model (FID/KID) during training (``eval.every``).
    supports_evaluation: bool = False

    def evaluate(self, run: "RunState", done_rounds: int, logger: "RunLogger") -> Dict[str, Any]:
        """FID/KID-style scores of the EMA model (rank 0); only if ``supports_evaluation``."""
        raise NotImplementedError(f"task '{self.name}' does not evaluate")


def task_class(name: str) -> type:
    """The registered task class ``name`` (the task modules register themselves on import)."""
    import fedrun.finetune  # noqa: F401  (registers "finetune")
    import fedrun.pretrain  # noqa: F401  (registers "train")

    return TASKS.get(name)


def build_task(name: str, cfg: "Config") -> Task:
    return task_class(name)(cfg)


def task_name_of(cfg: "Config") -> str:
    """The task a config describes: 'finetune' when ``finetune.pretrained`` is set (a fine-tuning
    config), else 'train' (pre-training)."""
    return "finetune" if cfg.finetune.pretrained else "train"
