"""Shared helpers: robust timing statistics, the machine description, rank-wide maxima."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch


def summarize(values: Sequence[float]) -> Dict[str, float]:
    """Median and spread of repeated measurements (the machine is shared: means lie)."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0}
    q1, q3 = (statistics.quantiles(vals, n=4, method="inclusive")[::2] if len(vals) > 1
              else (vals[0], vals[0]))
    return {"median": statistics.median(vals), "q1": q1, "q3": q3, "min": vals[0], "max": vals[-1],
            "n": len(vals)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, with the device drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a reader needs to judge the numbers: hardware, software, and how busy the box was."""
    from importlib.metadata import version  # not `import diffusers`: that takes seconds

    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    return info


def git_commit() -> str | None:
    """The commit the benchmarked code is at (``fedrun.engine.metrics.code_commit``)."""
    from fedrun.engine.metrics import code_commit

    return code_commit()


def loadavg() -> List[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False))
    tmp.replace(path)


def rank_max(values: Sequence[float], device: torch.device) -> List[float]:
    """Element-wise maximum over ranks (a collective: every rank must call it)."""
    import torch.distributed as torch_dist

    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor.cpu().tolist()


def bench_env(extra: dict | None = None) -> dict:
    """Environment for benchmark subprocesses: offline, quiet, no OpenMP spin-waiting."""
    repo = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", WANDB_SILENT="true",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=repo + (os.pathsep + path if path else ""))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra or {})
    return env
