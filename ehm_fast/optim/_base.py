"""What SVRG and STORM share: torch.optim conventions, the base rules (Adam, AdamW, SGD) fed a
control-variate direction through the fused kernels, and state that round-trips exactly."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import functional as F
from .replay import Closure, RNGState, evaluate

BASES = ("adam", "adamw", "sgd")


def check_hyperparameters(lr: float, base: str, betas: tuple[float, float], eps: float, momentum: float,
                          dampening: float, nesterov: bool, weight_decay: float) -> None:
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    if not 0.0 <= lr:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not 0.0 <= momentum:
        raise ValueError(f"momentum must be >= 0, got {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening = 0")


class ControlVariateOptimizer(Optimizer):
    """Base of SVRG and STORM: runs a base rule on v = (g - alpha g_ref) + alpha anchor.

    `held`: tensors the closure reads but this optimizer does not step (in a two-player game, the
    other player's weights). Their values at the reference point are part of it: g_ref is evaluated
    with both the own and the held tensors at their reference values, so that g - g_ref + anchor
    estimates the gradient at the current point without bias (the joint reference of SVRE). Without
    `held` the other tensors stay at their current values during the replay.

    A step whose loss, gradients or control-variate terms are not finite is skipped: no parameter
    or state changes, and `last_step_skipped` (a 0-d float tensor, maxed over ranks when
    torch.distributed is initialised) is 1; it is 0 after an applied step.
    """

    def __init__(self, params: Iterable, defaults: dict[str, Any], modules: Iterable[nn.Module],
                 generators: Iterable[torch.Generator], backend: Optional[str], held: Iterable[Tensor] = ()) -> None:
        check_hyperparameters(defaults["lr"], defaults["base"], defaults["betas"], defaults["eps"],
                              defaults["momentum"], defaults["dampening"], defaults["nesterov"],
                              defaults["weight_decay"])
        super().__init__(params, defaults)
        self.modules = list(modules)
        self.generators = list(generators)
        self.backend = backend
        self.held = list(held)
        own = {id(p) for p in self._params()}
        if any(id(t) in own for t in self.held):
            raise ValueError("held tensors must not be parameters of this optimizer")
        self.last_step_skipped = torch.zeros(())

    def _non_finite(self, loss: Tensor, *tensor_lists: Optional[Sequence[Tensor]]) -> bool:
        """Whether anything of the step is not finite (agreed over ranks); sets last_step_skipped."""
        tensors = [t for ts in tensor_lists if ts for t in ts if t is not None]
        found = (~torch.isfinite(loss.detach().float())).float().reshape(())
        if tensors:
            found = found.to(tensors[0].device)
            flags = torch._foreach_norm(tensors, ord=float("inf"))  # inf / NaN survive the max-norm
            found = torch.maximum(found, (~torch.isfinite(torch.stack([f.float() for f in flags]))).any().float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        self.last_step_skipped = found
        return bool(found.item())

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        check_hyperparameters(merged["lr"], merged["base"], merged["betas"], merged["eps"], merged["momentum"],
                              merged["dampening"], merged["nesterov"], merged["weight_decay"])
        super().add_param_group(param_group)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _evaluate(self, closure: Optional[Closure]) -> tuple[Tensor, list[Tensor], list[Tensor], RNGState]:
        """Runs the closure at the current parameters; (loss, params with a gradient, their gradients, RNG)."""
        if closure is None or not callable(closure):
            raise ValueError(f"{type(self).__name__}.step needs a closure that computes the loss, calls backward() "
                             "and returns the loss: it is evaluated again at the reference parameters")
        params = self._params()
        loss, grads, rng = evaluate(closure, params, self.generators)
        active = [(p, g) for p, g in zip(params, grads) if g is not None]
        for p, g in active:
            if g.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return loss, [p for p, _ in active], [g for _, g in active], rng

    @staticmethod
    def _check_reference(params: Sequence[Tensor], ref_grads: Sequence[Optional[Tensor]]) -> None:
        for i, g in enumerate(ref_grads):
            if g is None:
                raise RuntimeError(f"parameter {i} (shape {tuple(params[i].shape)}) got a gradient at the current "
                                   "values but none at the reference values: the closure must use the same "
                                   "parameters on every evaluation")
            if g.is_sparse:
                raise RuntimeError("sparse gradients are not supported")

    def _plan_base(self, params: list[Tensor], grads: list[Tensor], ref_grads: Optional[list[Tensor]],
                   anchors: Optional[list[Tensor]], directions: Optional[list[Tensor]],
                   alpha: float) -> tuple[list, list]:
        """Checks and plans the base rule's update of `params` (any groups); returns (launches,
        commits): run every launch, then every commit (which stores new state), only once all
        groups are planned."""
        where = {id(p): group for group in self.param_groups for p in group["params"]}
        launches, commits = [], []
        for group in self.param_groups:
            idx = [i for i, p in enumerate(params) if where[id(p)] is group]
            if not idx:
                continue
            ps = [params[i] for i in idx]
            pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
            args = (ps, pick(grads), pick(ref_grads), pick(anchors))
            if group["base"] == "sgd":
                launches_, commit = self._plan_sgd(group, args, pick(directions), alpha)
            else:
                launches_, commit = self._plan_adam(group, args, pick(directions), alpha)
            launches += launches_
            commits.append(commit)
        return launches, commits

    def _plan_sgd(self, group, args, directions, alpha):
        ps = args[0]
        buffers = [self.state[p].get("momentum_buffer") for p in ps]
        launch = F.plan_sgd(*args, buffers, alpha=alpha, lr=group["lr"], momentum=group["momentum"],
                            dampening=group["dampening"], nesterov=group["nesterov"],
                            weight_decay=group["weight_decay"], out_directions=directions, backend=self.backend)

        def commit() -> None:
            if group["momentum"] != 0:
                for p, b in zip(ps, buffers):
                    self.state[p]["momentum_buffer"] = b

        return [launch], commit

    def _plan_adam(self, group, args, directions, alpha):
        ps = args[0]
        beta1, beta2 = group["betas"]
        steps = [int(self.state[p]["step"].item()) + 1 if "step" in self.state[p] else 1 for p in ps]
        fresh = {}
        for p in ps:
            if "exp_avg" not in self.state[p]:
                kind = F.state_dtype(p.dtype)
                fresh[id(p)] = (torch.zeros_like(p, dtype=kind), torch.zeros_like(p, dtype=kind))
        moments = [fresh.get(id(p)) or (self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"]) for p in ps]
        launches = []
        for step in sorted(set(steps)):  # one launch per distinct step count (usually one)
            idx = [i for i, s in enumerate(steps) if s == step]
            pick = (lambda xs: None if xs is None else [xs[i] for i in idx])
            launches.append(F.plan_adam(
                *(pick(a) for a in args), [moments[i][0] for i in idx], [moments[i][1] for i in idx],
                alpha=alpha, step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], decoupled=group["base"] == "adamw",
                out_directions=pick(directions), backend=self.backend))

        def commit() -> None:
            for p, step, (m, v) in zip(ps, steps, moments):
                state = self.state[p]
                state["step"] = torch.tensor(float(step))
                state["exp_avg"], state["exp_avg_sq"] = m, v

        return launches, commit

    def _control_variate_reference(self) -> tuple[list[Tensor], list[Tensor], float, list[Tensor], list[Tensor]]:
        """(parameters, their reference values, alpha, held tensors, their reference values) for
        gradient_variance."""
        raise NotImplementedError

    # state that is not per parameter (subclasses add to it)
    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["control_variate"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch.optim's, but state tensors keep their saved dtype (fp32 state for bf16 params)
        and are copied, so the loaded optimizer shares no tensor with `state_dict`."""
        saved_state = state_dict["state"]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        for saved_id, p in zip(saved_ids, self._params()):
            if saved_id not in saved_state:
                continue
            self.state[p] = {k: v.to(device="cpu" if k == "step" else p.device, copy=True) if torch.is_tensor(v)
                             else v for k, v in saved_state[saved_id].items()}
        self._load_extra_state(state_dict.get("control_variate", {}))
