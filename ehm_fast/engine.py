"""The step engine: how a loss becomes an update. `ehm_fast.ehm` says what is minimised.

- `make_optimizer`: torch's fused Adam, or SVRG / STORM from `ehm_fast.optim`.
- `StepEngine.optimize`: backward through one DDP forward per phase, then the optimizer step,
  skipping (and counting in `bad_steps`) any step whose loss or gradients are not finite: fused
  Adam and SVRG / STORM skip inside their kernels (a `found_inf` flag, no host sync); torch's
  other Adams check on the host.
- `IterationGraphs`: one CUDA graph per critic-step count for a whole iteration, captured after
  warm-up iterations whose effect on the weights and optimizer state is undone.

Data-parallel: each phase's parameters are wrapped in DistributedDataParallel through
`PhaseModule`, whose forward runs the phase's whole loss closure (every network pass, the gradient
penalty's double backward included), so the reducer sees exactly one forward per backward and
averages exactly the parameters that phase trains (docs/ddp.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .config import ConfigError
from .nn.layers import profile_range

Metrics = dict[str, Tensor]
LossClosure = Callable[[], tuple[Tensor, Metrics]]


def make_optimizer(
    name: str, params: list[nn.Parameter], lr: float, betas: tuple[float, float], device: torch.device, *,
    capturable: bool = False, snapshot_every: int = 100, snapshot_batches: int = 16,
    modules: Iterable[nn.Module] = (), held: Iterable[Tensor] = (),
) -> torch.optim.Optimizer:
    """Adam (torch's fused kernel), or SVRG / STORM from ehm_fast.optim, driven with a closure.

    SVRG / STORM replay the closure at their reference point with the buffers of `modules`
    (batch-norm running statistics) kept as a plain step leaves them; `held` are the other
    player's weights, part of the reference point when it is joint (see ehm_fast.optim). The
    closures given to them draw no noise themselves (EHM draws it before), so their replays leave
    the generators alone, as CUDA-graph capture requires."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True, capturable=capturable and device.type == "cuda")
    if name not in ("svrg", "storm"):
        raise ConfigError(f"optimizer must be adam, svrg or storm, got {name!r}")
    from . import optim as eoptim

    if name == "svrg":
        return eoptim.SVRG(params, lr=lr, betas=betas, snapshot_every=snapshot_every,
                           snapshot_batches=snapshot_batches, modules=modules, held=held, replay_rng=False)
    return eoptim.STORM(params, lr=lr, betas=betas, modules=modules, held=held, replay_rng=False)


class PhaseModule(nn.Module):
    """What DDP wraps for one phase: exactly the parameters the phase trains (shared, no buffers);
    forward runs the phase's loss closure, so a backward follows exactly one DDP forward however
    many network passes (and autograd.grad calls) the loss makes."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.trained = nn.ParameterList(params)

    def forward(self, closure: Callable[[], Any]) -> Any:
        return closure()


def wrap_phase(params: list[nn.Parameter]) -> DistributedDataParallel:
    # gradient_as_bucket_view stays off: SVRG/STORM keep one evaluation's gradients while the
    # next backward runs, which bucket views would overwrite.
    return DistributedDataParallel(PhaseModule(params), device_ids=None)


class StepEngine:
    """Optimizer steps of one training run, with the count of skipped (non-finite) steps."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.world_size = world_size
        self.bad_steps = torch.zeros((), device=device)  # optimizer steps skipped (non-finite)
        self._one = torch.ones((), device=device)

    def any_rank(self, flag: Tensor) -> Tensor:
        """`flag` (1 = skip this step) maxed over ranks, so every rank skips the same steps."""
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def optimize(self, opt: torch.optim.Optimizer, params: list[Tensor], closure: LossClosure,
                 ddp: DistributedDataParallel | None, fresh: Callable[[], LossClosure]) -> Metrics:
        """Backward the closure's loss (through `ddp`, which averages the gradients over ranks) and
        step `opt`, skipping (and counting) non-finite steps. `fresh()` gives the loss closure of a
        new batch with new noise, for SVRG's snapshot passes."""

        def run(fn: LossClosure) -> tuple[Tensor, Metrics]:
            return fn() if ddp is None else ddp(fn)

        if isinstance(opt, torch.optim.Adam):
            opt.zero_grad(set_to_none=True)
            return self._adam_step(opt, params, run(closure))
        # SVRG / STORM re-evaluate the closure at their reference point (same batch and noise):
        # each evaluation is a DDP forward/backward, so the reference gradients are averaged over
        # ranks like the current ones and every rank keeps the same state.
        if getattr(opt, "snapshot_due", False) and not opt.schedule_by_caller:
            self.refresh_snapshot(opt, ddp, fresh)
        box: dict[str, Metrics] = {}

        def loss_closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss, metrics = run(closure)
            box.setdefault("m", metrics)  # the metrics at the current weights, not the replay's
            loss.backward()
            return loss.detach()

        opt.step(loss_closure)
        self.bad_steps += opt.last_step_skipped.to(self.bad_steps.device)
        return box["m"]

    def _adam_step(self, opt: torch.optim.Adam, params: list[Tensor], evaluated: tuple[Tensor, Metrics]) -> Metrics:
        loss, metrics = evaluated
        with profile_range("backward"):
            loss.backward()
        # 0-d like GradScaler's found_inf: fused Adam subtracts it in place from its 0-d step counts
        found = (~torch.isfinite(loss.detach())).float()
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one)
        found = self.any_rank(found)
        with profile_range("optimizer"):
            if opt.defaults.get("fused"):
                opt.found_inf = found  # the kernel does nothing where found_inf is 1
                opt.step()
            elif not found.item():  # torch's other Adams cannot skip on the device
                opt.step()
        self.bad_steps += found
        return metrics

    @staticmethod
    def refresh_snapshot(opt: Any, ddp: DistributedDataParallel | None, fresh: Callable[[], LossClosure]) -> None:
        """SVRG's snapshot: the mean gradient over snapshot_batches fresh batches (the current one
        again and again without a batch source). DDP's reduction is off there: SVRG sums the local
        gradients and all-reduces the sum once."""

        def snapshot_closure() -> Tensor:
            fn = fresh()
            loss, _ = fn() if ddp is None else ddp(fn)
            loss.backward()
            return loss.detach()

        with contextlib.nullcontext() if ddp is None else ddp.no_sync():
            opt.refresh_snapshot(snapshot_closure, opt.snapshot_batches)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]
    outputs: Metrics


class IterationGraphs:
    """Whole iterations in CUDA graphs, one per critic-step count.

    `iteration(inputs, n)` runs an iteration with n critic steps on the given batches; the tensors
    of `state()` (weights, buffers, optimizer state, counters) are saved before the warm-up and
    restored after it, so capturing does not change training."""

    def __init__(self, iteration: Callable[[list[Tensor], int], Metrics],
                 state: Callable[[], list[tuple[str, Tensor]]], optimizers: list[torch.optim.Optimizer]) -> None:
        self._iteration, self._state, self._optimizers = iteration, state, optimizers
        self._graphs: dict[int, _Graph] = {}

    def run(self, real: list[Tensor], n: int) -> Metrics:
        """Replays (capturing first if new) the iteration with `n` critic steps on `real`;
        returns the graph's output tensors (overwritten by the next replay)."""
        g = self._graphs.get(n) or self._capture(real, n)
        for buf, b in zip(g.inputs, real):
            buf.copy_(b, non_blocking=True)
        g.graph.replay()
        return g.outputs

    def clear(self) -> None:
        """Drops the graphs (they point at state tensors that a load replaces)."""
        self._graphs.clear()

    def _capture(self, real: list[Tensor], n: int) -> _Graph:
        # warm-up on a side stream, as torch.cuda.graphs requires
        inputs = [b.clone() for b in real]
        saved = {k: v.detach().clone() for k, v in self._state()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._iteration(inputs, n)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        for opt in self._optimizers:
            opt.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._iteration(inputs, n)
        self._graphs[n] = _Graph(graph, inputs, outputs)
        return self._graphs[n]

    @torch.no_grad()
    def _restore(self, saved: dict[str, Tensor]) -> None:
        for k, v in self._state():
            if k in saved:
                v.copy_(saved[k])
            else:  # optimizer state the warm-up created: a fresh Adam has zeros (step 0)
                v.zero_()


def compile_closure(closure: LossClosure) -> LossClosure:
    """`closure` under torch.compile (Inductor's default mode: no CUDA graphs of its own, so
    IterationGraphs can capture the compiled kernels, which its warm-up iterations compile first).
    A phase's closures share one code object: the first compiles and later ones reuse that graph
    while shapes, dtypes and options stay. The backward must be first order (aot_autograd refuses a
    double backward): the critic's closure compiles with lipschitz gp only under the
    explicit_penalty lever (docs/critic_penalty.md)."""
    return torch.compile(closure)
