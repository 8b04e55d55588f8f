"""Run directory, atomic checkpoints, resume.

A checkpoint is a folder ``checkpoints/round_NNNNN/`` with one safetensors file per tensor group
(``model``, ``ema``, ``server``) and ``state.json`` (round, config digest and view, SHA-256 of each
file, metrics so far). It is written under a temporary name, fsynced, then renamed: a crash
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from fedrun.errors import CheckpointError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"


def round_dir_name(global_round: int) -> str:
    return f"round_{global_round:05d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_checkpoints(run_dir: Path) -> List[Tuple[int, Path]]:
    """Completed checkpoints (those with a state.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        if child.name.startswith("round_") and (child / STATE_FILE).is_file():
            try:
                found.append((int(child.name.split("_", 1)[1]), child))
            except ValueError:
                continue
    return sorted(found)


def save_checkpoint(run_dir: Path, global_round: int, groups: Dict[str, Dict[str, torch.Tensor]],
                    state: dict, keep_last: int) -> Path:
    """Write ``checkpoints/round_NNNNN`` atomically and keep only the newest ``keep_last``."""
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / round_dir_name(global_round)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for name, tensors in groups.items():
        path = tmp / f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        _fsync_file(path)
        files[name] = _sha256(path)
    state = dict(state, round=global_round, files=files)
    atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
    if final.exists():  # the same round written again (a resumed run redoing it)
        trash = root / f".{final.name}.old-{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    path: Path
    state: dict
    groups: Dict[str, Dict[str, torch.Tensor]]

    @property
    def round(self) -> int:
        return int(self.state["round"])


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and verify a checkpoint folder; any damage is a CheckpointError naming the file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' does not exist or is not a folder")
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' has no {STATE_FILE} (incomplete checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file '{state_path}' is corrupt: {exc}") from None
    if not isinstance(state, dict) or "round" not in state or "files" not in state:
        raise CheckpointError(f"checkpoint file '{state_path}' lacks 'round' or 'files'")
    groups = {}
    for name, expected in state["files"].items():
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"checkpoint file '{file}' is missing")
        if _sha256(file) != expected:
            raise CheckpointError(f"checkpoint file '{file}' is corrupt or truncated "
                                  "(its SHA-256 differs from the one recorded in state.json)")
        try:
            groups[name] = load_file(str(file))
        except Exception as exc:
            raise CheckpointError(f"checkpoint file '{file}' cannot be read: {exc}") from None
    return Checkpoint(path, state, groups)


def describe_run_dir(run_dir: Path) -> str:
    ckpts = list_checkpoints(run_dir)
    finished = (Path(run_dir) / "final").is_dir()
    last = f"last checkpoint round {ckpts[-1][0]}" if ckpts else "no checkpoint"
    return f"{'finished' if finished else 'unfinished'}, {last}"


def prepare_run_dir(run_dir: Path, resume: str, overwrite: bool) -> Optional[Path]:
    """Decide how to start a run in ``run_dir``; returns the checkpoint to resume from, if any.

    Never deletes anything unless ``overwrite`` is true; an existing run without ``resume=auto``
    or ``overwrite=true`` is refused with a message saying what is there.
    """
    run_dir = Path(run_dir)
    if resume not in ("never", "auto"):
        target = Path(resume)
        if not (target / STATE_FILE).is_file():
            raise CheckpointError(f"config key 'resume': '{resume}' is not a checkpoint folder "
                                  f"(no {STATE_FILE}); use 'auto', 'never' or a checkpoints/round_NNNNN path")
        run_dir.mkdir(parents=True, exist_ok=True)
        return target
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"config key 'output_dir': '{run_dir}' exists and is not a folder")
    if occupied and overwrite:
        if resume == "auto":
            raise CheckpointError("config keys 'resume' and 'overwrite': resume=auto and "
                                  "overwrite=true contradict each other; choose one")
        shutil.rmtree(run_dir)
        occupied = False
    if not occupied:
        run_dir.mkdir(parents=True, exist_ok=True)
        return None
    ckpts = list_checkpoints(run_dir)
    if resume == "auto":
        return ckpts[-1][1] if ckpts else None
    raise CheckpointError(
        f"output_dir '{run_dir}' already holds a run ({describe_run_dir(run_dir)}); pass "
        "resume=auto to continue it, overwrite=true to replace it, or choose another output_dir")
