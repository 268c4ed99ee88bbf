"""STORM: v_t = g_t + (1 - a) (v_{t-1} - g_t(w_{t-1})), no snapshot and no full pass."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from . import functional as F
from ._base import ControlVariateOptimizer
from .reference import copy_unless
from .replay import Closure, evaluate_at


class STORM(ControlVariateOptimizer):
    """The STORM recursive-momentum estimator over a base rule (Adam, AdamW or SGD, torch.optim's semantics).

    Keeps, per parameter, the previous step's parameters w_{t-1} (parameter dtype) and direction
    v_{t-1} (fp32 state): one buffer each, no copy of the network and no full pass. Each
    `step(closure)` runs the closure at w_t, replays it at w_{t-1} with the same RNG state
    (BatchNorm statistics of `modules` untouched) and hands v_t to the base rule. The first step
    (and a parameter's first step after add_param_group) uses v = g. a = 1 is the plain base rule.

    With `held` tensors (the other player's weights in a game) w_{t-1} includes their values at
    this optimizer's previous step, so the correction g_t(w_{t-1}) is the gradient at the previous
    point of both players (the joint reference); without, the replay reads their current values.
    Non-finite steps are skipped on the device (`last_step_skipped`) and leave w_{t-1} and v_{t-1}
    as they were; w_{t-1} and v_{t-1} are updated in place, so a captured CUDA graph keeps reading them.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, *, a: float = 0.1, base: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 modules: Iterable[nn.Module] = (), generators: Iterable[torch.Generator] = (),
                 backend: Optional[str] = None, held: Iterable[Tensor] = (), replay_rng: bool = True) -> None:
        if not 0.0 < a <= 1.0:
            raise ValueError(f"a must be in (0, 1], got {a}")
        defaults = dict(lr=lr, base=base, betas=tuple(betas), eps=eps, momentum=momentum, dampening=dampening,
                        nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults, modules, generators, backend, held, replay_rng)
        self.a = a
        self._held_previous: Optional[list[Tensor]] = None

    def _state_ready(self, params) -> bool:
        joint_known = not self.held or self._held_previous is not None
        return joint_known and all("previous" in self.state[p] for p in params) and super()._state_ready(params)

    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Tensor:
        loss, params, grads, rng = self._evaluate(closure)
        alpha = 1.0 - self.a
        joint_known = not self.held or self._held_previous is not None
        known = [p for p in params if "previous" in self.state[p]] if joint_known else []
        ref_by_id: dict[int, Tensor] = {}
        if known and alpha != 0.0:
            values = [self.state[p]["previous"] for p in known] + (self._held_previous or [])
            _, ref = evaluate_at(closure, known, values, rng, self.modules, swap=known + self.held)
            self._check_reference(known, ref)
            ref_by_id = {id(p): g for p, g in zip(known, ref)}
        old_directions = [self.state[p]["direction"] for p in known if id(p) in ref_by_id]
        found = self._found_non_finite(loss, grads, list(ref_by_id.values()), old_directions)
        ready = self._state_ready(params)
        if not params or (not ready and self._skip_on_host(found)):
            return loss
        on_device = found if ready else None  # else checked on the host: nothing to skip
        directions = [self.state[p].get("direction") for p in params]
        directions = [torch.empty_like(p, dtype=F.state_dtype(p.dtype)) if d is None else d
                      for p, d in zip(params, directions)]
        with_cv = [i for i, p in enumerate(params) if id(p) in ref_by_id]
        plain = [i for i, p in enumerate(params) if id(p) not in ref_by_id]
        launches, commits = [], []
        for idx, cv in ((with_cv, True), (plain, False)):
            if not idx:
                continue
            pick = (lambda xs, idx=idx: [xs[i] for i in idx])
            ps = pick(params)
            launch, commit = self._plan_base(
                ps, pick(grads), [ref_by_id[id(p)] for p in ps] if cv else None, pick(directions) if cv else None,
                pick(directions), alpha=alpha if cv else 0.0, found=on_device)
            launches += launch
            commits += commit
        # every check has passed: w_{t-1} <- w_t (unless skipped), then the update
        previous = [self.state[p].get("previous") for p in params]
        previous = [p.detach().clone() if w is None else copy_unless(on_device, w, p) for p, w in zip(params, previous)]
        for run in launches + commits:
            run()
        for p, w, d in zip(params, previous, directions):
            self.state[p]["previous"], self.state[p]["direction"] = w, d
        if self.held:
            self._held_previous = [t.detach().clone() if w is None else copy_unless(on_device, w, t)
                                   for t, w in zip(self.held, self._held_previous or [None] * len(self.held))]
        return loss

    def held_reference(self) -> list[Tensor]:
        return list(self._held_previous or [])

    def _extra_state(self) -> dict[str, Any]:
        return {"held_previous": self._held_previous}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        held = extra.get("held_previous")
        self._held_previous = None if held is None else [
            v.to(t.device, t.dtype, copy=True) for v, t in zip(held, self.held)]

    def _control_variate_reference(self) -> tuple[list[Tensor], list[Tensor], float, list[Tensor], list[Tensor]]:
        params = [p for p in self._params() if "previous" in self.state[p]]
        held = self._held_previous or []
        return params, [self.state[p]["previous"] for p in params], 1.0 - self.a, self.held[:len(held)], held
