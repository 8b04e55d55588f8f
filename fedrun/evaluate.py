"""Runs on disk: ``fedrun sample`` (samples of a run's EMA model, shared among the ranks) and
``fedrun evaluate`` (FID/KID of those samples, with the floor: see ``fedrun.features``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from fedrun.errors import CheckpointError, EvaluationError
from fedrun.features import build_evaluator, generate, to_model_range, warn_if_few
from fedrun.grids import save_grid


def open_run(run_dir, overrides: Optional[List[str]] = None):
    """The resolved config of the run in ``run_dir`` (with ``overrides``); clear errors otherwise."""
    from fedrun.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory '{run_dir}' does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"'{run_dir}' is not a fedrun run directory (it has no config.yaml)")
    return load_config(str(run_dir / "config.yaml"), overrides)


def require_scorable(run_dir, cfg, verb: str) -> None:
    """Sampling and scoring a run from disk go through its task: refuse a task that does not
    support it (LoRA fine-tuning), saying what the run offers instead."""
    from fedrun.task import task_class, task_name_of

    name = task_name_of(cfg)
    if not task_class(name).supports_evaluation:
        raise EvaluationError(
            f"fedrun {verb}: run '{run_dir}' is a '{name}' run (finetune.pretrained="
            f"'{cfg.finetune.pretrained}'), and `fedrun {verb}` scores unconditional DDPM runs only. "
            "Its final/ holds LoRA weights for stock diffusers: pipe = StableDiffusionPipeline."
            "from_pretrained(BASE); pipe.load_lora_weights(final/); its per-prompt sample grids "
            "are in samples/")


def load_run_model(run_dir, cfg, checkpoint: Optional[str] = None):
    """(EMA U-Net, noise scheduler, label) of a run: ``final/`` by default, else the newest
    checkpoint; ``checkpoint`` may be 'final', 'latest', a round number or a checkpoint folder."""
    from fedrun.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    final = run_dir / "final"
    found = list_checkpoints(run_dir)
    if checkpoint is None:
        checkpoint = "final" if (final / "model_index.json").is_file() else "latest"
    if checkpoint == "final":
        if not (final / "model_index.json").is_file():
            raise CheckpointError(f"run '{run_dir}' has no final/ pipeline (unfinished?); "
                                  "use checkpoint=latest or a round number")
        from diffusers import DDPMPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        pipe = DDPMPipeline.from_pretrained(str(final))
        return pipe.unet.eval(), pipe.scheduler, "final"
    if checkpoint == "latest":
        if not found:
            raise CheckpointError(f"run '{run_dir}' has no checkpoint and no final/ folder: nothing to "
                                  "sample from (did it stop before its first checkpoint?)")
        path = found[-1][1]
    elif str(checkpoint).isdigit():
        rounds = {r: p for r, p in found}
        if int(checkpoint) not in rounds:
            raise CheckpointError(f"run '{run_dir}' has no checkpoint of round {checkpoint} "
                                  f"(available: {sorted(rounds) or 'none'})")
        path = rounds[int(checkpoint)]
    else:
        path = Path(checkpoint)
    return (*_unet_from_checkpoint(path, cfg), path.name)


def _unet_from_checkpoint(path: Path, cfg):
    from fedrun.checkpoint import load_checkpoint
    from fedrun.models import build_noise_scheduler, build_unet

    ckpt = load_checkpoint(path)
    ema = ckpt.groups.get("ema")
    if not ema or "conv_in.weight" not in ema:
        raise CheckpointError(f"checkpoint '{path}' holds no EMA U-Net weights to sample from")
    unet = build_unet(cfg.model, cfg.data.image_size, ema["conv_in.weight"].shape[1], cfg.seed)
    missing, unexpected = unet.load_state_dict(ema, strict=False)
    if unexpected or len(missing) == len(unet.state_dict()):
        raise CheckpointError(f"checkpoint '{path}' does not fit the run's model "
                              f"({len(unexpected)} unexpected, {len(missing)} missing tensors)")
    return unet.eval(), build_noise_scheduler(cfg.diffusion)


def sample_run(run_dir, cfg, checkpoint: Optional[str] = None, out: Optional[str] = None,
               say=print) -> Optional[Path]:
    """``eval.num_samples`` samples of a run's EMA model to ``samples.npz`` + ``grid.png``; under
    torchrun each rank draws its share of the chunks and rank 0 assembles them."""
    from fedrun import dist
    from fedrun.models import sample_chunks

    require_scorable(run_dir, cfg, "sample")
    with dist.session(cfg.device, cfg.dist_timeout_s, cfg.threads):
        rank, world = dist.rank(), dist.world_size()
        unet, noise_scheduler, label = load_run_model(run_dir, cfg, checkpoint)
        e = cfg.eval
        folder = Path(out) if out else (Path(run_dir) / "generated" /
                                        f"{label}_{e.scheduler}{e.steps if e.scheduler == 'ddim' else ''}"
                                        f"_n{e.num_samples}_seed{e.seed}")
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        chunks = sample_chunks(unet, noise_scheduler, e.num_samples, e.scheduler, e.steps, e.seed, rank, world)
        np.savez(folder / f".rank{rank}.npz", **{str(i): a for i, a in chunks.items()})
        dist.barrier()
        if rank != 0:
            return None
        parts = {}
        for r in range(world):
            shard = folder / f".rank{r}.npz"
            with np.load(shard) as data:
                parts.update({int(k): data[k] for k in data.files})
            shard.unlink()
        images = np.concatenate([parts[i] for i in sorted(parts)])
        np.savez_compressed(folder / "samples.npz", images=(images * 255).round().astype(np.uint8))
        save_grid(images[:64], folder / "grid.png")
        info = {"run": str(run_dir), "model": label, "num_samples": len(images), "scheduler": e.scheduler,
                "steps": e.steps, "seed": e.seed, "world_size": world,
                "seconds": time.perf_counter() - started}
        (folder / "info.json").write_text(json.dumps(info, indent=1))
        say(f"{len(images)} samples of {run_dir} ({label}, {e.scheduler}) in {info['seconds']:.0f} s "
            f"on {world} rank(s): {folder / 'samples.npz'}")
        return folder


def load_samples(path) -> np.ndarray:
    """(N, H, W, C) floats in [0, 1] from a samples.npz written by ``fedrun sample``."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.npz"
    if not path.is_file():
        raise EvaluationError(f"samples file '{path}' does not exist")
    with np.load(path) as data:
        if "images" not in data.files:
            raise EvaluationError(f"'{path}' holds no 'images' array (not written by fedrun sample)")
        return data["images"].astype(np.float32) / 255.0


def evaluate_run(run_dir, cfg, checkpoint: Optional[str] = None, samples: Optional[str] = None,
                 say=print) -> dict:
    """FID/KID (+ floor, class mix) of a run's samples: from ``samples`` or freshly generated."""
    from fedrun import dist
    from fedrun.data import build_datasets

    require_scorable(run_dir, cfg, "evaluate")
    with dist.session(cfg.device, cfg.dist_timeout_s, cfg.threads):
        evaluator = build_evaluator(cfg.eval, *build_datasets(cfg.data, cfg.seed))
        if samples is not None:
            images, label = load_samples(samples), str(samples)
        else:
            unet, noise_scheduler, label = load_run_model(run_dir, cfg, checkpoint)
            images = generate(unet, noise_scheduler, cfg.eval)
        warn_if_few(len(images))
        record = {"run": str(run_dir), "model": label, **evaluator.report(to_model_range(images))}
        name = f"evaluation_{Path(label).name if samples is None else 'samples'}_{cfg.eval.feature}.json"
        (Path(run_dir) / name).write_text(json.dumps(record, indent=1))
        say(f"FID {record['fid']:.4g} (floor {record['floor_fid']:.4g}), KID {record['kid']:.4g} ± "
            f"{record['kid_std']:.3g} (floor {record['floor_kid']:.4g}); {record['eval_samples']} samples vs "
            f"{record['eval_reference']} held-out images, {cfg.eval.feature} features -> {Path(run_dir) / name}")
        return record
