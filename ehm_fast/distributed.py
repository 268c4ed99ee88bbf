"""torch.distributed helpers: what torchrun asked for, the process group's set-up and view, and
the global log-partition estimate.

Before the process group exists the trainer reads `launched()` (torchrun's environment) and calls
`setup_process_group`; after that, and everywhere else, `rank_and_world()` is the one way to ask
for this process's rank and the number of processes. Without torchrun everything here runs as a
single process.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import losses
from .config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def current() -> DistInfo:
    """`rank_and_world()` with torchrun's LOCAL_RANK (0 without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(*rank_and_world(), int(os.environ.get("LOCAL_RANK", "0")))


def launched() -> DistInfo:
    """What torchrun asks of this process (RANK, LOCAL_RANK, WORLD_SIZE; one process without
    them), read before any process group exists."""
    try:
        env = {k: int(os.environ.get(k, d)) for k, d in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"))}
    except ValueError:
        raise ConfigError("RANK, LOCAL_RANK and WORLD_SIZE must be integers") from None
    return DistInfo(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"])


def setup_process_group(device: torch.device, world_size: int) -> str:
    """The default process group (NCCL for CUDA, gloo for the CPU), or a check of one already set
    up; returns its backend."""
    if not dist.is_initialized():
        if device.type == "cuda":
            if not dist.is_nccl_available():
                raise ConfigError("this PyTorch build has no NCCL, which data-parallel training on GPUs needs; "
                                  "use --device cpu (gloo) or a CUDA build of PyTorch")
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    backend = str(dist.get_backend())
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("the process group uses NCCL, which only moves CUDA tensors, but this run is on the CPU: "
                          "use --device cuda (one GPU per process) or a gloo process group")
    if backend == "gloo" and device.type == "cuda":
        warnings.warn("the process group uses gloo for CUDA tensors: it works, but NCCL (what torchrun with "
                      "--device cuda sets up) is much faster", RuntimeWarning, stacklevel=2)
    if dist.get_world_size() != world_size:
        raise ConfigError(f"WORLD_SIZE is {world_size} but the process group has {dist.get_world_size()} processes")
    return backend


def global_log_partition(
    scores: Tensor, log_proposal: Tensor | None = None, *, estimator: str = "importance", backend: str | None = None
) -> Tensor:
    """log Z_hat over the generated samples of every rank: the M log-weights of each rank are
    gathered, the estimate is one logsumexp over the global M (the same value on every rank).

    The gather is differentiable and its backward sums over ranks, so each rank's own samples
    receive world_size * w_i * grad: DistributedDataParallel's gradient averaging then yields
    exactly the gradient of the global estimate. Without a process group it is `log_partition`.
    """
    info = current()
    z = scores if log_proposal is None else scores - log_proposal
    if not info.enabled:
        return losses.log_partition(z, estimator=estimator, backend=backend)
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros((), dtype=torch.long, device=z.device) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor(z.shape[-1], device=z.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(f"every rank must hold the same number of samples, got {[int(s) for s in sizes]}")
    return losses.log_partition(torch.cat(all_gather(z.contiguous()), dim=-1), estimator=estimator, backend=backend)
