"""torch.distributed helpers: the process group's view and the global log-partition estimate.

The trainer (`ehm_fast.train`) sets the process group up under torchrun; without one everything
here runs as a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import losses


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


def current() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


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
