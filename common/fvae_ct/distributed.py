"""Scale-out on PyTorch's own distributed runtime: one process per GPU (or per CPU process), launched by torchrun.

The backend follows the device: NCCL on CUDA, gloo on CPU, so the same bundle configs run on a laptop and on a
cluster. Without torchrun (no ``WORLD_SIZE`` in the environment) every function here is the single-process case:
rank 0 of 1, collectives return at once. Work is split by :func:`shard` (greedy by size, deterministic).
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "local_device",
    "init",
    "destroy",
    "is_distributed",
    "rank",
    "world_size",
    "launch_world_size",
    "is_main",
    "barrier",
    "gather_objects",
    "broadcast_object",
    "shard",
    "ddp",
    "unwrap",
    "state_digest",
    "check_in_sync",
]

log = logging.getLogger("fvae_ct")

#: how long a collective waits for the slowest rank (a rank may finish its share hours after another)
DEFAULT_TIMEOUT_MINUTES = 240


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (``cuda:0`` without torchrun), else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device: str | torch.device | None = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> int:
    """Join the torchrun process group (NCCL for a CUDA ``device``, gloo otherwise); returns the world size.

    A no-op returning 1 when the process was not started by torchrun (``WORLD_SIZE`` unset or 1), or when the
    group is already initialised (then its size is returned). On CUDA the process's current device is set.
    """
    device = torch.device(device) if device is not None else local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=float(timeout_minutes))
    dist.init_process_group(backend=backend, timeout=timeout)
    log.info("rank %d of %d joined the process group (%s, %s)", rank(), world_size(), backend, device)
    return dist.get_world_size()


def destroy() -> None:
    """Leave the process group (if any), all ranks together: a barrier first, so that no rank tears down its
    communication threads while another still talks to it."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launch_world_size() -> int:
    """Processes of this launch as torchrun announces them (``WORLD_SIZE``; 1 without torchrun), readable before the
    process group exists (a config's learning rate is parsed before ``init``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 (also a single process): the one that merges, validates its results and writes checkpoints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (the others pass anything, e.g. ``None``)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(sizes: Sequence[float], n: int) -> list[list[int]]:
    """Split items of the given ``sizes`` (e.g. voxel counts) into ``n`` disjoint shares of near-equal total size.

    Greedy longest-first: items by size, largest first (ties by index), each to the share with the smallest total
    so far (ties: the lowest rank). Deterministic, so every rank computes the same split. Each share lists its
    item indices in ascending order. The largest share exceeds the mean by at most the largest item.
    """
    if n < 1:
        raise ValueError(f"shard: need at least one share, got {n}")
    totals = [0.0] * n
    shares: list[list[int]] = [[] for _ in range(n)]
    for i in sorted(range(len(sizes)), key=lambda i: (-float(sizes[i]), i)):
        r = min(range(n), key=lambda r: (totals[r], r))
        shares[r].append(i)
        totals[r] += float(sizes[i])
    return [sorted(s) for s in shares]


def ddp(module: torch.nn.Module, device: str | torch.device | None = None, **kwargs) -> torch.nn.Module:
    """``module`` on ``device`` wrapped in ``DistributedDataParallel`` (``device_ids`` only on CUDA); the module
    itself in a single process. ``kwargs`` go to DDP (e.g. ``find_unused_parameters``)."""
    device = torch.device(device) if device is not None else local_device()
    module = module.to(device)
    if not is_distributed():
        return module
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, **kwargs)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (``module`` itself otherwise)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def state_digest(module_or_state) -> str:
    """SHA-256 of a module's ``state_dict`` (or of a state dict): names, dtypes, shapes and exact bytes."""
    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_in_sync(module: torch.nn.Module) -> list[str]:
    """Every rank's :func:`state_digest` of ``module`` (a DDP wrapper is unwrapped), in rank order, on every rank.

    Raises ``RuntimeError`` listing the ranks that differ from rank 0: after data-parallel training all ranks must
    hold identical weights; a difference means a rank trained apart (e.g. a module outside DDP)."""
    module = unwrap(module)
    digests = gather_objects(state_digest(module))
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise RuntimeError(f"the weights of rank(s) {bad} differ from rank 0's after training (not in sync)")
    if len(digests) > 1:
        log.info("weights identical on all %d ranks (sha256 %s)", len(digests), digests[0][:16])
    return digests
