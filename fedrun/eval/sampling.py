"""Runs on disk: ``fedrun sample`` (samples of a run's EMA model, shared among the ranks) and
``fedrun evaluate`` (their scores, with the floor: ``fedrun.eval.features``). Both ask the run's
task: it loads the model (``Task.load_sampler``) and scores the samples (``Task.score_samples``);
a task that cannot be scored this way says what its run offers instead.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from fedrun.errors import CheckpointError, EvaluationError
from fedrun.eval.features import build_evaluator, warn_if_few
from fedrun.eval.images import save_grid
from fedrun.tasks.base import Draw, RunSampler

#: samples per chunk: chunk i is drawn from a generator seeded by (seed, i), so the samples do
#: not depend on how many ranks share the chunks
CHUNK = 250

__all__ = ["CHUNK", "Draw", "RunSampler", "draw_all", "draw_chunks", "evaluate_run",
           "load_samples", "open_run", "sample_run", "save_samples"]


def open_run(run_dir, overrides: Optional[List[str]] = None):
    """The resolved config of the run in ``run_dir`` (with ``overrides``); clear errors otherwise."""
    from fedrun.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory '{run_dir}' does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"'{run_dir}' is not a fedrun run directory (it has no config.yaml)")
    return load_config(str(run_dir / "config.yaml"), overrides)


def run_task(cfg):
    """The run's task (``task.name`` of its config)."""
    from fedrun.tasks.base import build_task

    return build_task(cfg)


def checkpoint_path(run_dir: Path, checkpoint: Optional[str], final_marker: str) -> Optional[Path]:
    """The checkpoint folder ``checkpoint`` names ('latest', a round number or a path), or None for
    'final' (the default when ``final/<final_marker>`` exists, else the newest checkpoint)."""
    from fedrun.engine.checkpoint import list_checkpoints

    final = Path(run_dir) / "final"
    found = list_checkpoints(run_dir)
    if checkpoint is None:
        checkpoint = "final" if (final / final_marker).is_file() else "latest"
    if checkpoint == "final":
        if not (final / final_marker).is_file():
            raise CheckpointError(f"run '{run_dir}' has no final/ model (unfinished?); "
                                  "use checkpoint=latest or a round number")
        return None
    if checkpoint == "latest":
        if not found:
            raise CheckpointError(f"run '{run_dir}' has no checkpoint and no final/ folder: nothing to "
                                  "sample from (did it stop before its first checkpoint?)")
        return found[-1][1]
    if str(checkpoint).isdigit():
        rounds = {r: p for r, p in found}
        if int(checkpoint) not in rounds:
            raise CheckpointError(f"run '{run_dir}' has no checkpoint of round {checkpoint} "
                                  f"(available: {sorted(rounds) or 'none'})")
        return rounds[int(checkpoint)]
    return Path(checkpoint)


def draw_chunks(sampler: RunSampler, num_samples: int, rank: int = 0,
                world_size: int = 1) -> Dict[int, Tuple[np.ndarray, Optional[np.ndarray]]]:
    """Chunks ``rank, rank + W, ...`` of ``num_samples`` samples."""
    out = {}
    for index in range(rank, math.ceil(num_samples / CHUNK), world_size):
        out[index] = sampler.draw(min(CHUNK, num_samples - index * CHUNK), index)
    return out


def draw_all(sampler: RunSampler, num_samples: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    chunks = draw_chunks(sampler, num_samples)
    return _concatenate([chunks[i] for i in sorted(chunks)])


def _concatenate(parts) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    images = np.concatenate([p[0] for p in parts])
    labels = None if parts[0][1] is None else np.concatenate([p[1] for p in parts])
    return images, labels


def sample_run(run_dir, cfg, checkpoint: Optional[str] = None, out: Optional[str] = None,
               say=print) -> Optional[Path]:
    """``eval.num_samples`` samples of a run's EMA model to ``samples.npz`` (+ the requested
    ``labels`` of a conditional task) and ``grid.png``; under torchrun each rank draws its share
    of the chunks and rank 0 assembles them."""
    from fedrun.engine import dist

    task = run_task(cfg)
    with dist.session(cfg.device, cfg.dist_timeout_s, cfg.threads):
        rank, world = dist.rank(), dist.world_size()
        sampler = task.load_sampler(Path(run_dir), checkpoint)
        e = cfg.eval
        folder = Path(out) if out else (Path(run_dir) / "generated" /
                                        f"{sampler.label}_{e.scheduler}{e.steps if e.scheduler == 'ddim' else ''}"
                                        f"_n{e.num_samples}_seed{e.seed}")
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        chunks = draw_chunks(sampler, e.num_samples, rank, world)
        shard = {f"images_{i}": images for i, (images, _) in chunks.items()}
        shard.update({f"labels_{i}": labels for i, (_, labels) in chunks.items() if labels is not None})
        np.savez(folder / f".rank{rank}.npz", **shard)
        dist.barrier()
        if rank != 0:
            return None
        parts: Dict[int, tuple] = {}
        for r in range(world):
            path = folder / f".rank{r}.npz"
            with np.load(path) as data:
                for key in data.files:
                    if key.startswith("images_"):
                        index = int(key.split("_")[1])
                        labels = data[f"labels_{index}"] if f"labels_{index}" in data.files else None
                        parts[index] = (data[key], labels)
            path.unlink()
        images, labels = _concatenate([parts[i] for i in sorted(parts)])
        save_samples(folder / "samples.npz", images, labels)
        save_grid(images[:64], folder / "grid.png")
        info = {"run": str(run_dir), "task": task.name, "model": sampler.label,
                "num_samples": len(images), "scheduler": e.scheduler, "steps": e.steps,
                "seed": e.seed, "world_size": world, "seconds": time.perf_counter() - started}
        (folder / "info.json").write_text(json.dumps(info, indent=1))
        say(f"{len(images)} samples of {run_dir} ({sampler.label}, {e.scheduler}) in "
            f"{info['seconds']:.0f} s on {world} rank(s): {folder / 'samples.npz'}")
        return folder


def save_samples(path: Path, images: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
    arrays: Dict[str, Any] = {"images": (images * 255).round().astype(np.uint8)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    np.savez_compressed(path, **arrays)


def load_samples(path, with_labels: bool = False):
    """(N, H, W, C) floats in [0, 1] from a samples.npz written by ``fedrun sample`` (and its
    labels, or None, with ``with_labels``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.npz"
    if not path.is_file():
        raise EvaluationError(f"samples file '{path}' does not exist")
    with np.load(path) as data:
        if "images" not in data.files:
            raise EvaluationError(f"'{path}' holds no 'images' array (not written by fedrun sample)")
        images = data["images"].astype(np.float32) / 255.0
        labels = data["labels"] if "labels" in data.files else None
    return (images, labels) if with_labels else images


def evaluate_run(run_dir, cfg, checkpoint: Optional[str] = None, samples: Optional[str] = None,
                 say=print) -> dict:
    """The scores (FID/KID + floor, class mix; a conditional task's accuracy on the requested
    labels) of a run's samples: from ``samples`` or freshly generated."""
    from fedrun.data import build_datasets
    from fedrun.engine import dist

    task = run_task(cfg)
    with dist.session(cfg.device, cfg.dist_timeout_s, cfg.threads):
        if not task.supports_evaluation:
            raise EvaluationError(task.not_scorable(Path(run_dir)))
        evaluator = build_evaluator(cfg.eval, *build_datasets(cfg.data, cfg.seed))
        if samples is not None:
            (images, labels), label = load_samples(samples, with_labels=True), str(samples)
        else:
            sampler = task.load_sampler(Path(run_dir), checkpoint)
            images, labels = draw_all(sampler, cfg.eval.num_samples)
            label = sampler.label
        warn_if_few(len(images))
        record = {"run": str(run_dir), "model": label, **task.score_samples(images, labels, evaluator)}
        name = f"evaluation_{Path(label).name if samples is None else 'samples'}_{cfg.eval.feature}.json"
        (Path(run_dir) / name).write_text(json.dumps(record, indent=1))
        say(f"FID {record['fid']:.4g} (floor {record['floor_fid']:.4g}), KID {record['kid']:.4g} ± "
            f"{record['kid_std']:.3g} (floor {record['floor_kid']:.4g}); {record['eval_samples']} samples vs "
            f"{record['eval_reference']} held-out images, {cfg.eval.feature} features"
            + (f"; TSTR accuracy {record['tstr_accuracy']:.3f} (train on real {record['trtr_accuracy']:.3f}, "
               f"chance {record['tstr_chance']:.3f})" if "tstr_accuracy" in record else "")
            + f" -> {Path(run_dir) / name}")
        return record
