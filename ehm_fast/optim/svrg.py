"""SVRG: the base rule fed v = g - g_snap + mu_snap, with g_snap from a replay of the same minibatch."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from . import functional as F
from ._base import ControlVariateOptimizer
from .replay import Closure, evaluate_at, preserved_buffers

POLICIES = ("periodic", "random")


class SVRG(ControlVariateOptimizer):
    """Stochastic variance-reduced gradient over a base rule (Adam, AdamW or SGD, torch.optim's semantics).

    Keeps, per parameter, the snapshot w_snap (parameter dtype) and the mean gradient mu_snap there
    (fp32 state). Each `step(closure)` runs the closure at w (the minibatch gradient g), replays it
    at w_snap with the same RNG state (g_snap; BatchNorm statistics of `modules` untouched) and
    hands v = g - g_snap + mu_snap to the base rule.

    With `held` tensors (the other player's weights in a game) the snapshot holds their values too
    and g_snap and mu_snap are both taken at the joint snapshot, so v is an unbiased estimate of the
    gradient at the current point of both (SVRE's estimator); without, the replay reads the held
    tensors' current values while mu_snap was computed at their old ones. Non-finite steps are
    skipped on the device (`last_step_skipped`).

    The snapshot is refreshed by `refresh_snapshot(closure)`, which averages the gradient over
    `snapshot_batches` calls of `closure` (each should draw its own batch) and all-reduces it when
    torch.distributed is initialised. It is due every `snapshot_every` steps ("periodic") or after
    each step with probability 1 / snapshot_every ("random", the loopless SVRG). Given
    `snapshot_closure`, step() refreshes by itself when due (and before the first step);
    otherwise call refresh_snapshot when `snapshot_due` says so. With `schedule_by_caller` set
    (the trainer's CUDA graphs, whose replays run no Python) step() neither refreshes nor counts:
    the caller refreshes when due and calls `advance_schedule(steps)` after the steps ran.
    Refreshes write into the same snapshot tensors, so a captured step reads the new ones.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, *, base: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 snapshot_every: int = 100, snapshot_policy: str = "periodic", snapshot_batches: int = 16,
                 snapshot_closure: Optional[Closure] = None, modules: Iterable[nn.Module] = (),
                 generators: Iterable[torch.Generator] = (), seed: Optional[int] = None,
                 backend: Optional[str] = None, held: Iterable[Tensor] = (), replay_rng: bool = True) -> None:
        if not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError(f"snapshot_every must be an int >= 1, got {snapshot_every!r}")
        if snapshot_policy not in POLICIES:
            raise ValueError(f"snapshot_policy must be one of {POLICIES}, got {snapshot_policy!r}")
        if not isinstance(snapshot_batches, int) or snapshot_batches < 1:
            raise ValueError(f"snapshot_batches must be an int >= 1, got {snapshot_batches!r}")
        defaults = dict(lr=lr, base=base, betas=tuple(betas), eps=eps, momentum=momentum, dampening=dampening,
                        nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults, modules, generators, backend, held, replay_rng)
        self.schedule_by_caller = False
        self.snapshot_every = snapshot_every
        self.snapshot_policy = snapshot_policy
        self.snapshot_batches = snapshot_batches
        self.snapshot_closure = snapshot_closure
        # the "random" policy's coin, apart from the user's generators so it never shifts their draws
        self._coin = torch.Generator().manual_seed(
            int(torch.randint(2**62, (1,)).item()) if seed is None else seed)
        self._steps_since_snapshot = 0
        self._due = True
        self._held_snapshot: Optional[list[Tensor]] = None

    @property
    def snapshot_due(self) -> bool:
        """Whether the policy asks for a new snapshot now (always before the first one)."""
        return self._due or not self.has_snapshot

    @property
    def has_snapshot(self) -> bool:
        own = all("snapshot" in self.state[p] for p in self._params() if p.requires_grad)
        return own and (not self.held or self._held_snapshot is not None)

    @torch.no_grad()
    def refresh_snapshot(self, closure: Closure, num_batches: Optional[int] = None) -> None:
        """w_snap <- w (and the held tensors' values), mu_snap <- mean gradient over num_batches
        closure calls (default snapshot_batches), summed over ranks when torch.distributed is
        initialised. The modules' buffers are left as they were."""
        num_batches = self.snapshot_batches if num_batches is None else num_batches
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
        params = self._params()
        kept = [p.grad for p in params]
        sums = [torch.zeros_like(p, dtype=F.state_dtype(p.dtype)) for p in params]
        try:
            with preserved_buffers(self.modules):
                for _ in range(num_batches):
                    for p in params:
                        p.grad = None
                    with torch.enable_grad():
                        loss = closure()
                    if loss is None:
                        raise RuntimeError("the snapshot closure returned no loss: it must compute the loss on a "
                                           "batch, call backward() and return the loss")
                    for s, p in zip(sums, params):
                        if p.grad is not None:
                            if p.grad.is_sparse:
                                raise RuntimeError("SVRG does not support sparse gradients")
                            s.add_(p.grad)
        finally:
            for p, g in zip(params, kept):
                p.grad = g
        count = num_batches
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for s in sums:
                torch.distributed.all_reduce(s)
            count *= torch.distributed.get_world_size()
        for p, s in zip(params, sums):
            state = self.state[p]
            if "snapshot" in state:  # in place: a captured CUDA graph reads these tensors
                state["snapshot"].copy_(p.detach())
                state["snapshot_mean"].copy_(s.div_(count))
            else:
                state["snapshot"], state["snapshot_mean"] = p.detach().clone(), s.div_(count)
        if self._held_snapshot is None:
            self._held_snapshot = [t.detach().clone() for t in self.held]
        else:
            for w, t in zip(self._held_snapshot, self.held):
                w.copy_(t.detach())
        self._steps_since_snapshot = 0
        self._due = False

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Tensor:
        if self.snapshot_closure is not None and self.snapshot_due and not self.schedule_by_caller:
            self.refresh_snapshot(self.snapshot_closure)
        if not self.has_snapshot:
            raise RuntimeError("SVRG has no snapshot for some parameters: call refresh_snapshot(closure) before the "
                               "first step and after add_param_group, or pass snapshot_closure=")
        loss, params, grads, rng = self._evaluate(closure)
        ref_grads, anchors = [], []
        if params:
            snapshots = [self.state[p]["snapshot"] for p in params] + (self._held_snapshot or [])
            _, ref_grads = evaluate_at(closure, params, snapshots, rng, self.modules, swap=params + self.held)
            self._check_reference(params, ref_grads)
            anchors = [self.state[p]["snapshot_mean"] for p in params]
        found = self._found_non_finite(loss, grads, ref_grads, anchors)
        ready = self._state_ready(params)
        if params and (ready or not self._skip_on_host(found)):
            launches, commits = self._plan_base(params, grads, ref_grads, anchors, None, alpha=1.0,
                                                found=found if ready else None)
            for run in launches + commits:
                run()
        if not self.schedule_by_caller:
            self.advance_schedule(1)  # a skipped step counts too: a non-finite snapshot gets replaced
        return loss

    def advance_schedule(self, steps: int) -> None:
        """Counts `steps` steps towards the next snapshot (step() does it unless schedule_by_caller)."""
        for _ in range(steps):
            self._steps_since_snapshot += 1
            if self.snapshot_policy == "periodic":
                self._due = self._steps_since_snapshot >= self.snapshot_every
            else:
                self._due = self._due or bool(torch.rand((), generator=self._coin) < 1.0 / self.snapshot_every)

    def _extra_state(self) -> dict[str, Any]:
        return {"steps_since_snapshot": self._steps_since_snapshot, "due": self._due,
                "coin": self._coin.get_state(), "held_snapshot": self._held_snapshot}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        if extra:
            self._steps_since_snapshot = extra["steps_since_snapshot"]
            self._due = extra["due"]
            self._coin.set_state(extra["coin"])
            held = extra.get("held_snapshot")
            self._held_snapshot = None if held is None else [
                v.to(t.device, t.dtype, copy=True) for v, t in zip(held, self.held)]

    def held_reference(self) -> list[Tensor]:
        return list(self._held_snapshot or [])

    def ready(self) -> bool:
        return self.has_snapshot and super().ready()

    def _control_variate_reference(self) -> tuple[list[Tensor], list[Tensor], float, list[Tensor], list[Tensor]]:
        params = [p for p in self._params() if "snapshot" in self.state[p]]
        held = self._held_snapshot or []
        return params, [self.state[p]["snapshot"] for p in params], 1.0, self.held[:len(held)], held
