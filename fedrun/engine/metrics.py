"""Run logging on rank 0: metrics.jsonl, a tqdm bar over rounds, Weights & Biases (offline by default).

Other ranks get a logger whose methods do nothing, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from fedrun.config import LoggingConfig

METRICS_FILE = "metrics.jsonl"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null is what readers expect
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    return value


jsonable = _jsonable  # public name: records are also stored in checkpoints


def read_metrics(run_dir: Path) -> list:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _round_of(line: str) -> float:
    """The round of a metrics line; a torn line (a worker killed while writing it) is dropped."""
    try:
        return json.loads(line).get("round", 0)
    except json.JSONDecodeError:
        return math.inf


def truncate_metrics(run_dir: Path, after_round: int, last_record: Optional[dict] = None) -> None:
    """Drop records of rounds after ``after_round`` (a resumed run recomputes them).

    ``last_record`` is the record of round ``after_round`` saved in its checkpoint: it is put back
    when the process was killed after writing the checkpoint but before logging the round."""
    from fedrun.engine.checkpoint import atomic_write_text

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file() and last_record is None:
        return
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines if line.strip() and _round_of(line) <= after_round]
    if last_record is not None and not any(_round_of(line) == after_round for line in kept):
        kept.append(json.dumps(_jsonable(last_record)))
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class RunLogger:
    """Writes one JSON object per line; mirrors scalars and images to W&B; drives the bar."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, config_dict: dict, total_rounds: int,
                 start_round: int, enabled: bool, job_type: str = "train"):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        self._file = open(self.run_dir / METRICS_FILE, "a")
        if cfg.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_rounds, initial=start_round, desc=job_type, unit="round",
                             dynamic_ncols=True, file=sys.stderr)
        if cfg.wandb and os.environ.get("WANDB_MODE", cfg.wandb_mode) != "disabled":
            self._wandb = self._start_wandb(cfg, config_dict, job_type)

    def _start_wandb(self, cfg: LoggingConfig, config_dict: dict, job_type: str):
        os.environ.setdefault("WANDB_SILENT", "true")
        # Keep W&B's cache inside the run instead of ~/.cache (offline runs must be self-contained).
        os.environ.setdefault("WANDB_CACHE_DIR", str(self.run_dir / "wandb" / "cache"))
        import wandb

        (self.run_dir / "wandb").mkdir(exist_ok=True)
        return wandb.init(project=cfg.wandb_project, dir=str(self.run_dir), config=config_dict,
                          mode=os.environ.get("WANDB_MODE", cfg.wandb_mode), job_type=job_type,
                          name=self.run_dir.name, reinit="finish_previous")

    def log(self, record: Dict[str, Any]) -> None:
        """Append one record (must carry 'round') to metrics.jsonl and its scalars to W&B."""
        if not self.enabled:
            return
        record = _jsonable(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
            self._wandb.log(scalars, step=int(record["round"]))

    def progress(self, global_round: int, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.n = global_round
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v)
                                   for k, v in postfix.items()}, refresh=False)
            self._bar.refresh()

    def image(self, global_round: int, key: str, image: np.ndarray, caption: str = "") -> None:
        """An HxWxC uint8 image to W&B (files are written by the caller)."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(image, caption=caption)}, step=global_round)

    def write(self, message: str) -> None:
        """A line of text that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def summary(self, values: Dict[str, Any]) -> None:
        if self._wandb is not None:
            for key, value in _jsonable(values).items():
                self._wandb.summary[key] = value

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def code_commit() -> str | None:
    """The commit the benchmarked code is at, with "+dirty" when the working tree differs from it
    (results committed afterwards name the commit that produced them)."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]  # the checkout fedrun runs from
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")
