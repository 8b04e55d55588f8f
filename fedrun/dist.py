"""The only module that touches ``torch.distributed`` (and the torchrun environment).

Everything else asks ``rank()``, ``world_size()``, ``all_reduce_sum()``. World size 1 is the
degenerate case: no process group is created and every collective returns at once.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

from fedrun.errors import DistributedError

# The process-group timeout given to init(), quoted when a collective fails.
_timeout_s: Optional[int] = None


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else _env_int("RANK", 0)


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    return _env_int("LOCAL_WORLD_SIZE", 1)


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _cpu_share() -> int:
    """This rank's share of the cores: oversubscribed OpenMP threads make CPU steps 10-20x slower."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size()))


def init(device: str = "auto", timeout_s: int = 1800, threads: Optional[int] = None) -> torch.device:
    """Bind this process to its device and join the process group (when launched by torchrun).

    NCCL with ``cuda:LOCAL_RANK`` when CUDA is used, gloo on CPU. Returns the device.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for but CUDA is not available")
        torch.cuda.set_device(local_rank())
        dev = torch.device("cuda", local_rank())
    else:
        torch.set_num_threads(threads or _cpu_share())
        dev = torch.device("cpu")
    if launched_by_torchrun() and world_size() > 1 and not is_initialized():
        _warn_if_restarts_cannot_reconnect()
        global _timeout_s
        _timeout_s = timeout_s
        torch_dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return dev


@contextlib.contextmanager
def session(device: str = "auto", timeout_s: int = 1800, threads: Optional[int] = None):
    """``with session(...) as device:`` -- ``init``, and tear the process group down on exit if
    this call created it (whoever creates the group destroys it; a caller that already holds a
    group, e.g. a test harness running several jobs in one group, keeps it)."""
    created = not is_initialized()
    dev = init(device, timeout_s, threads)
    try:
        yield dev
    finally:
        if created:
            destroy()


def _warn_if_restarts_cannot_reconnect() -> None:
    """torchrun --max-restarts shares its store with the workers by default, and restarted
    workers may then read the addresses of the dead ones (pytorch/pytorch#135712)."""
    restarts = _env_int("TORCHELASTIC_MAX_RESTARTS", 0)
    if restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and rank() == 0:
        print("fedrun: warning: torchrun --max-restarts with a shared rendezvous store: restarted "
              "workers may fail to connect; export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before "
              "torchrun (the launch/slurm scripts do)", file=sys.stderr, flush=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place. One collective; a no-op for world size 1.

    A collective that fails or outlives the process-group timeout (a rank hung or died) raises
    DistributedError instead of blocking forever."""
    if is_initialized() and world_size() > 1:
        try:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        except RuntimeError as exc:  # DistBackendError, DistNetworkError, gloo timeouts
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(
                f"all_reduce on rank {rank()} of {world_size()} failed: another rank hung, died or "
                f"lost its connection (process-group timeout dist_timeout_s={_timeout_s}): {detail}"
            ) from exc
    return tensor


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        torch_dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (used for run-directory decisions, not per round)."""
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj if rank() == src else None]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel (gradients averaged over the ranks during
    backward); the module itself when there is no process group (world size 1)."""
    if not (is_initialized() and world_size() > 1):
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [module.device.index] if getattr(module, "device", None) is not None \
        and module.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


def no_sync(module: torch.nn.Module):
    """Context without DDP's gradient all-reduce (gradient accumulation); a no-op otherwise."""
    import contextlib

    return module.no_sync() if hasattr(module, "no_sync") else contextlib.nullcontext()


def destroy() -> None:
    if is_initialized():
        torch_dist.destroy_process_group()


def describe(device: Optional[torch.device] = None) -> str:
    backend = torch_dist.get_backend() if is_initialized() else "none"
    threads = torch.get_num_threads()
    return f"rank {rank()}/{world_size()} backend={backend} device={device} threads={threads}"
