"""The only module that touches ``torch.distributed`` (and the torchrun environment).

Everything else asks ``rank()``, ``world_size()``, ``all_reduce_sum()``. World size 1 is the
degenerate case: no process group is created and every collective returns at once.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DevicePlan:
    """Which device a rank uses, which backend the ranks talk over, and why."""

    device: str  # "cpu" or "cuda:N"
    backend: str  # "nccl" or "gloo"
    staged: bool  # CUDA tensors reduced through a pinned CPU copy (gloo with shared GPUs)
    reason: str


def plan_devices(local_rank_: int, local_world_size_: int, device_count: int,
                 use_cuda: bool) -> DevicePlan:
    """Rank -> device and backend (pure: unit-tested without GPUs).

    Rank k uses ``cuda:(k mod device_count)``. NCCL (>= 2.5) refuses two ranks on one GPU
    ("Duplicate GPU detected", NVIDIA/nccl#418), so when a GPU hosts more than one rank of this
    node the ranks talk gloo, and the round's CUDA buffer is staged through pinned CPU memory;
    NCCL when every rank owns its GPU. Several ranks per GPU is how a simulator keeps a large GPU
    busy with small client models (pfl-research recommends 1-5 processes per GPU). The decision
    is made per node from LOCAL_WORLD_SIZE: nodes of a job must have the same number of GPUs.
    """
    if not use_cuda:
        return DevicePlan("cpu", "gloo", False, "CPU ranks talk gloo")
    if device_count < 1:
        raise RuntimeError("device='cuda' was asked for but CUDA is not available")
    device = f"cuda:{local_rank_ % device_count}"
    if local_world_size_ <= device_count:
        return DevicePlan(device, "nccl", False, f"{local_world_size_} rank(s) on {device_count} "
                          "GPU(s), one GPU each: NCCL")
    per_gpu = -(-local_world_size_ // device_count)
    return DevicePlan(device, "gloo", True,
                      f"{local_world_size_} ranks share {device_count} GPU(s) (up to {per_gpu} per "
                      "GPU): NCCL refuses two ranks on one GPU, so collectives use gloo, the round "
                      "buffer staged through pinned CPU memory")


_plan: Optional[DevicePlan] = None
_staging: dict = {}  # (numel, dtype) -> pinned CPU tensor, reused every round


def init(device: str = "auto", timeout_s: int = 1800, threads: Optional[int] = None) -> torch.device:
    """Bind this process to its device and join the process group (when launched by torchrun).

    See ``plan_devices`` for the device and backend; rank 0 prints the choice and the reason.
    Returns the device.
    """
    global _plan, _timeout_s
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    count = torch.cuda.device_count() if use_cuda else 0
    plan = plan_devices(local_rank(), local_world_size(), count, use_cuda)
    if use_cuda:
        dev = torch.device(plan.device)
        torch.cuda.set_device(dev)
        torch.set_num_threads(threads or _cpu_share())
    else:
        # One thread per CPU rank unless told otherwise: a kernel's reductions depend on its
        # thread count, and equal threads per rank keep any number of processes bit-identical.
        torch.set_num_threads(threads or 1)
        dev = torch.device("cpu")
    if launched_by_torchrun() and world_size() > 1 and not is_initialized():
        _warn_if_restarts_cannot_reconnect()
        _timeout_s = timeout_s
        if use_cuda and rank() == 0:
            print(f"fedrun: {plan.reason}", file=sys.stderr, flush=True)
        torch_dist.init_process_group(
            backend=plan.backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if plan.backend == "nccl" else None,
        )
        _plan = plan
    return dev


def shares_gpus() -> bool:
    """Whether ranks of this node share a GPU (see ``plan_devices``)."""
    return _plan is not None and _plan.staged


def _staging_forced() -> bool:
    """FEDRUN_STAGE_COLLECTIVES=1: stage every all-reduce (tests the shared-GPU path on CPU)."""
    return os.environ.get("FEDRUN_STAGE_COLLECTIVES") == "1"


def _stage_through_cpu(tensor: torch.Tensor) -> bool:
    """gloo with ranks sharing a GPU: reduce a copy in (pinned) CPU memory."""
    return _staging_forced() or (shares_gpus() and tensor.is_cuda)


def _staging_buffer(tensor: torch.Tensor) -> torch.Tensor:
    key = (tensor.numel(), tensor.dtype)
    if key not in _staging:
        _staging[key] = torch.empty(tensor.numel(), dtype=tensor.dtype,
                                    pin_memory=torch.cuda.is_available())
    return _staging[key]


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
            if _stage_through_cpu(tensor):
                host = _staging_buffer(tensor)
                host.copy_(tensor.reshape(-1))
                torch_dist.all_reduce(host, op=torch_dist.ReduceOp.SUM)
                tensor.copy_(host.view_as(tensor))
            else:
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


def destroy() -> None:
    global _plan
    if is_initialized():
        torch_dist.destroy_process_group()
    _plan = None
    _staging.clear()


def describe(device: Optional[torch.device] = None) -> str:
    backend = torch_dist.get_backend() if is_initialized() else "none"
    if is_initialized() and (shares_gpus() or _staging_forced()):
        backend += " (staged through CPU memory)"
    threads = torch.get_num_threads()
    note = ("" if device is not None and torch.device(device).type == "cuda" else
            f" (bit-identical across process counts at {threads} thread(s) per rank)")
    return f"rank {rank()}/{world_size()} backend={backend} device={device} threads={threads}{note}"
