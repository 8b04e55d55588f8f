"""The task contract: what the engine, the centralized baseline, ``sample``, ``evaluate`` and
``audit`` need from a kind of training.

A task (DDPM pre-training, LoRA fine-tuning of Stable Diffusion, a class-conditional DiT, ...) is
a folder ``fedrun/tasks/<name>/`` whose ``__init__`` registers a ``Task`` subclass with
``@TASKS.register("<name>")``; ``task.name: <name>`` in a config selects it, and the engine finds
it through the registry (torchtitan's TrainSpec: a model is a folder). The task owns its config
sections (``config_sections``: top-level keys such as ``model`` or ``finetune``, validated and
documented like the core ones), its data and model, its loss, its samples, its export, how a
finished run is loaded for ``fedrun sample`` / ``evaluate`` and what ``fedrun audit`` examines.
Optional hooks have no-op defaults, so a task implements the five abstract methods and overrides
only what it needs. The federated state is always the trainable parameters of ``Built.model``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import (TYPE_CHECKING, Any, Callable, ClassVar, Dict, List, Optional, Protocol, Sequence,
                    Tuple)

import numpy as np
import torch

from fedrun.errors import EvaluationError

if TYPE_CHECKING:  # for annotations only
    from fedrun.config import Config
    from fedrun.engine.metrics import RunLogger
    from fedrun.fl.aggregation.buffer import RoundResult, Segment


class TrainingData(Protocol):
    """What the engine needs of a data set: its size, batches by index, labels (or None)."""

    labels: Optional[np.ndarray]

    def __len__(self) -> int: ...

    def get_batch(self, indices: np.ndarray) -> Any: ...


class RunView(Protocol):
    """What a task's hooks see of a run: ``fedrun.engine.run.Run`` provides it (the contract
    names what it uses, so that it does not import the engine that imports it)."""

    cfg: "Config"
    device: torch.device
    rank: int
    world_size: int
    dataset: TrainingData
    client_indices: Sequence[np.ndarray]
    model: torch.nn.Module  # the training replica
    params: Any  # fedrun.engine.flat.FlatParameters: the trainable parameters, one vector
    noise_scheduler: Any
    global_weights: torch.Tensor
    ema: Any  # fedrun.engine.ema.EMA: ``.shadow`` holds the averaged weights
    resume_from: Optional[Path]  # the checkpoint folder the run continues from, or None


#: ``draw(n, chunk_index)``: chunk ``chunk_index`` of n samples: images (n, H, W, C) in [0, 1]
#: and the labels the model was asked for (a conditional task) or None
Draw = Callable[[int, int], Tuple[np.ndarray, Optional[np.ndarray]]]


@dataclass
class RunSampler:
    """The model of a finished run, ready to draw samples (``Task.load_sampler``)."""

    label: str  # 'final' or the checkpoint folder's name
    draw: Draw


@dataclass
class AuditSubject:
    """What ``fedrun audit`` needs of a run, whatever its task (``Task.audit_subject``)."""

    kind: str  # the run's task
    members: torch.Tensor  # (M, C, H, W) in [-1, 1]: the training images
    member_clients: np.ndarray  # (M,) the client holding each
    nonmembers: torch.Tensor  # (H, C, H, W): never trained on
    generate: Callable[[int, int], np.ndarray]  # (n, chunk index) -> (n, H, W, C) in [0, 1]
    per_image_loss: Callable[[torch.Tensor, torch.Generator, int], torch.Tensor]  # (images, gen, t)
    num_train_timesteps: int
    description: str


@dataclass
class ClientExtras:
    """What a task adds to a client's contribution (``Task.finish_client``): values of its buffer
    segments (``Task.segments``) and state for the client state store."""

    segments: Dict[str, torch.Tensor]
    state: Optional[Dict[str, torch.Tensor]] = None


@dataclass
class Built:
    """What a task builds for the engine."""

    dataset: TrainingData
    model: torch.nn.Module  # its trainable parameters are the federated state
    noise_scheduler: Any  # a diffusers scheduler (the training noise schedule)


class Task(abc.ABC):
    """Base class of every task; ``name`` is set by ``@TASKS.register``."""

    name: str = "task"
    #: The config sections this task owns: top-level key -> dataclass (docstrings per field,
    #: validation in __post_init__). Only the selected task's sections are valid in a config.
    config_sections: ClassVar[Dict[str, type]] = {}
    #: Whether the engine scores the EMA model during training (``eval.every``) and
    #: ``fedrun sample`` / ``evaluate`` can score a finished run (``load_sampler``).
    supports_evaluation: ClassVar[bool] = False

    def __init__(self, cfg: "Config"):
        self.cfg = cfg

    @classmethod
    def check_config(cls, cfg: "Config") -> None:
        """Refuse a config this task cannot run (a ConfigError naming the key); called by the
        config loader once the whole config is validated."""

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
    def describe(self, run: RunView) -> str:
        """One line for the start of the log: data and model."""

    @abc.abstractmethod
    def write_samples(self, run: RunView, done_rounds: int, logger: "RunLogger") -> None:
        """samples/round_NNNNN.png of the EMA model (rank 0)."""

    @abc.abstractmethod
    def export(self, run: RunView, out_dir: Path) -> None:
        """final/: a folder stock diffusers loads (a pipeline, or LoRA weights)."""

    # ------------------------------------------------------------ optional hooks
    def prepare(self, run: RunView) -> None:
        """Called once the run exists (before any round or restore)."""

    def observe_client(self, run: RunView, client: int, weight: float, global_round: int) -> None:
        """After a client's accepted update, with the client's weights still in the replica."""

    # A task whose clients do not all train the global vector as it is (LoRA variants: per-client
    # parts, per-client ranks, server-side refactoring) uses the five hooks below; the defaults
    # leave the round exactly as the engine runs it.
    def keeps_client_state(self) -> bool:
        """Whether clients keep state of the task's between their rounds (then the engine opens
        the client state store and hands it to ``start_client`` / takes it from
        ``finish_client``)."""
        return False

    def start_client(self, run: RunView, client: int, global_round: int,
                     state: Optional[Dict[str, torch.Tensor]]) -> None:
        """Before local training, with the global weights in the replica: set what this client
        starts from (``state``: its stored state, or None)."""

    def finish_client(self, run: RunView, client: int, weight: float,
                      global_round: int) -> Optional[ClientExtras]:
        """After local training, before the update (replica - global) enters the round buffer:
        the client's segment values and state (None: nothing). May change the replica."""
        return None

    def segments(self, run: RunView) -> List["Segment"]:
        """Segments of the round buffer this task fills in ``finish_client`` (the same on every
        rank)."""
        return []

    def server_step(self, run: RunView, result: "RoundResult") -> None:
        """After the server strategy's step, on every rank alike: a task whose server does more
        than the strategy (refactoring, merging) sets ``run.global_weights`` here."""

    def client_bytes(self, run: RunView, client: int,
                     result: "RoundResult") -> Optional[Tuple[int, int]]:
        """(uplink, downlink) bytes of ``client`` in the reduced round ``result``: what it sends
        and what it receives. None: the engine's count (the fp32 federated vector and the client
        algorithm's segments, each way)."""
        return None

    # Vectorized clients (``client.vectorize``, ``fedrun.fl.vectorized``) train a group of clients
    # at once under torch.func's vmap, which cannot give each client its own generator: a task
    # that supports them splits ``loss`` into the step's drawn inputs and the loss of them.
    #: Whether this task implements ``draw_step``, ``step_loss`` (and, if needed,
    #: ``functional_model``), so that ``client.vectorize`` may be set.
    supports_vectorized_clients: ClassVar[bool] = False

    def draw_step(self, indices: np.ndarray, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Everything a training step's loss reads that is data or random (the batch, noise,
        timesteps, ...), drawn from ``generator`` in the order ``loss`` draws it, on the
        task's device: ``loss(model, indices, generator)`` must equal
        ``step_loss(model, draw_step(indices, generator))``."""
        raise NotImplementedError(f"task '{self.name}' does not support vectorized clients")

    def step_loss(self, model: Callable[..., Any], inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss given one step's drawn inputs (``draw_step``); ``model`` is called like
        the module (under vmap: ``torch.func.functional_call`` of ``functional_model``'s copy)
        and must draw nothing random."""
        raise NotImplementedError(f"task '{self.name}' does not support vectorized clients")

    def functional_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of the replica ``model`` to run under torch.func (its trainable parameters are
        replaced by the clients' stacked weights); the same function as ``model``, possibly
        with other kernels (a batching rule vmap lacks)."""
        import copy

        return copy.deepcopy(model)

    def round_metrics(self, run: RunView, global_round: int, result: "RoundResult") -> Dict[str, Any]:
        """Extra metrics of a reduced federated round, before the server step. Called on every
        rank (it may run a collective, the same on every rank)."""
        return {}

    def summary(self, run: RunView) -> Dict[str, Any]:
        """Extra keys for the run summary (rank 0, at the end)."""
        return {}

    def evaluate(self, run: RunView, done_rounds: int, logger: "RunLogger") -> Dict[str, Any]:
        """Scores of the EMA model during training (rank 0); only if ``supports_evaluation``."""
        raise NotImplementedError(f"task '{self.name}' does not evaluate")

    # ------------------------------------------------------------ finished runs
    def load_sampler(self, run_dir: Path, checkpoint: Optional[str]) -> RunSampler:
        """The model of a finished run, for ``fedrun sample`` and ``evaluate`` (final/ by
        default, or ``checkpoint``: 'final', 'latest', a round number or a folder)."""
        raise EvaluationError(self.not_scorable(run_dir))

    def not_scorable(self, run_dir: Path) -> str:
        """Why ``fedrun sample`` / ``evaluate`` cannot score this task's runs, and what to do."""
        return (f"run '{run_dir}' is a '{self.name}' run, which `fedrun sample` and `fedrun "
                "evaluate` cannot score; its samples are in samples/ and its model in final/")

    def score_samples(self, images: np.ndarray, labels: Optional[np.ndarray],
                      evaluator: Any) -> Dict[str, Any]:
        """The scores of samples of this task's model: FID/KID with the floor (the evaluator's
        report); a conditional task adds what its conditioning asked for (``labels``)."""
        from fedrun.eval.features import to_model_range

        return evaluator.report(to_model_range(images))

    def audit_subject(self, run_dir: Path, heldout: Optional[str]) -> AuditSubject:
        """What ``fedrun audit`` examines: members, non-members, samples, per-image loss
        (``heldout``: the audit's ``--heldout`` folder of non-members, if given)."""
        raise EvaluationError(f"fedrun audit: run '{run_dir}' is a '{self.name}' run, which the "
                              "audit does not cover")


def build_task(cfg: "Config") -> Task:
    """The task ``cfg.task.name`` names (its folder is imported on first use)."""
    from fedrun.registry import TASKS

    return TASKS.get(cfg.task.name, "task.name")(cfg)
