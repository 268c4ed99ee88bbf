"""torch.distributed helpers: process-group setup under torchrun and the global log-partition estimate.

`torchrun --nproc_per_node N -m ehm_fast.train ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them everything runs as a single process and these helpers are no-ops.
"""

from __future__ import annotations

import datetime
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


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: str | torch.device | None = None, timeout_s: float = 600.0) -> tuple[DistInfo, torch.device]:
    """Initialise the default process group when launched by torchrun (NCCL for CUDA, gloo for
    CPU, chosen from the device) and return (info, this rank's device)."""
    want_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not launched_by_torchrun():
        return DistInfo(), torch.device(device or ("cuda" if want_cuda else "cpu"))
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if want_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("a CUDA device was asked for but this rank sees no GPU: NCCL needs one GPU per rank")
        if info.local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(info.local_rank)
        run_device, backend = torch.device("cuda", info.local_rank), "nccl"
    else:
        run_device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return info, run_device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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
