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
    or state changes, and `last_step_skipped` (a 0-d float tensor on the parameters' device,
    maxed over ranks when torch.distributed is initialised) is 1; it is 0 after an applied
    step. The skip happens on the device (the kernels' found_inf, step counts as device tensors), so
    a step reads nothing back to the host and can be captured in a CUDA graph; only a parameter's
    first step, which creates its state, checks on the host.

    `replay_rng`: rewind the CPU, CUDA and `generators` states before each replay so that a
    closure that draws noise itself sees the same draws. A closure whose noise is drawn before it
    (as ehm_fast's EHM draws it) needs none: False, which CUDA-graph capture requires (a
    generator's state cannot be read or set while capturing).
    """

    def __init__(self, params: Iterable, defaults: dict[str, Any], modules: Iterable[nn.Module],
                 generators: Iterable[torch.Generator], backend: Optional[str], held: Iterable[Tensor] = (),
                 replay_rng: bool = True) -> None:
        check_hyperparameters(defaults["lr"], defaults["base"], defaults["betas"], defaults["eps"],
                              defaults["momentum"], defaults["dampening"], defaults["nesterov"],
                              defaults["weight_decay"])
        super().__init__(params, defaults)
        self.modules = list(modules)
        self.generators = list(generators)
        self.backend = backend
        self.held = list(held)
        self.replay_rng = replay_rng
        own = {id(p) for p in self._params()}
        if any(id(t) in own for t in self.held):
            raise ValueError("held tensors must not be parameters of this optimizer")
        self.last_step_skipped = torch.zeros(())

    def _found_non_finite(self, loss: Tensor, *tensor_lists: Optional[Sequence[Tensor]]) -> Tensor:
        """1 where anything of the step is not finite, else 0 (a one-element float32 tensor on the
        device, agreed over ranks; nothing read back); sets last_step_skipped."""
        tensors = [t for ts in tensor_lists if ts for t in ts if t is not None]
        found = (~torch.isfinite(loss.detach().float())).float().reshape(1)
        if tensors:
            found = found.to(tensors[0].device)
            flags = torch._foreach_norm(tensors, ord=float("inf"))  # inf / NaN survive the max-norm
            found = torch.maximum(found, (~torch.isfinite(torch.stack([f.float() for f in flags]))).any().float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        self.last_step_skipped = found.reshape(())
        return found

    def _state_ready(self, params: Sequence[Tensor]) -> bool:
        """Whether every parameter has the base rule's state (else this step creates it: a host check)."""
        where = {id(p): group for group in self.param_groups for p in group["params"]}
        for p in params:
            group = where[id(p)]
            key = "momentum_buffer" if group["base"] == "sgd" else "exp_avg"
            if (group["base"] != "sgd" or group["momentum"] != 0) and key not in self.state[p]:
                return False
        return True

    def ready(self) -> bool:
        """Whether a step now finds all the state it needs: it then reads nothing back to the host
        and can be captured in a CUDA graph (the first step of a parameter creates its state)."""
        return self._state_ready([p for p in self._params() if p.requires_grad])

    def _skip_on_host(self, found: Tensor) -> bool:
        """Reads the flag back: only for a step that creates state."""
        return bool(found.item())

    def held_reference(self) -> list[Tensor]:
        """The held tensors' reference values this optimizer keeps (updated in place)."""
        return []

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
        loss, grads, rng = evaluate(closure, params, self.generators if self.replay_rng else None)
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
                   alpha: float, found: Optional[Tensor]) -> tuple[list, list]:
        """Checks and plans the base rule's update of `params` (any groups), skipped on the device
        where `found` is nonzero (None: checked on the host already); returns (launches, commits):
        run every launch, then every commit (which stores new state), only once all groups are
        planned."""
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
                launches_, commit = self._plan_sgd(group, args, pick(directions), alpha, found)
            else:
                launches_, commit = self._plan_adam(group, args, pick(directions), alpha, found)
            launches += launches_
            commits.append(commit)
        return launches, commits

    def _plan_sgd(self, group, args, directions, alpha, found):
        ps = args[0]
        buffers = [self.state[p].get("momentum_buffer") for p in ps]
        launch = F.plan_sgd(*args, buffers, alpha=alpha, lr=group["lr"], momentum=group["momentum"],
                            dampening=group["dampening"], nesterov=group["nesterov"],
                            weight_decay=group["weight_decay"], out_directions=directions, found_inf=found,
                            backend=self.backend)

        def commit() -> None:
            if group["momentum"] != 0:
                for p, b in zip(ps, buffers):
                    self.state[p]["momentum_buffer"] = b

        return [launch], commit

    def _plan_adam(self, group, args, directions, alpha, found):
        ps = args[0]
        beta1, beta2 = group["betas"]
        fresh = {}
        for p in ps:
            if "exp_avg" not in self.state[p]:
                kind = F.state_dtype(p.dtype)
                fresh[id(p)] = (torch.zeros_like(p, dtype=kind), torch.zeros_like(p, dtype=kind),
                                torch.zeros((), dtype=torch.float32, device=p.device))
        state = [fresh.get(id(p)) or (self.state[p]["exp_avg"], self.state[p]["exp_avg_sq"], self.state[p]["step"])
                 for p in ps]
        counts = [c for _, _, c in state]
        update = F.plan_adam(*args, [m for m, _, _ in state], [v for _, v, _ in state], alpha=alpha, step=counts,
                             lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"], decoupled=group["base"] == "adamw",
                             out_directions=directions, found_inf=found, backend=self.backend)

        def launch() -> None:  # the counts after this update, on the device: + 1, or + 0 if skipped
            if found is None:
                torch._foreach_add_(counts, 1.0)
            else:
                torch._foreach_add_(counts, [(1 - found).reshape(())] * len(counts))
            update()

        def commit() -> None:
            for p, (m, v, count) in zip(ps, state):
                self.state[p].update(exp_avg=m, exp_avg_sq=v, step=count)

        return [launch], commit

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
            self.state[p] = {k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v
                             for k, v in saved_state[saved_id].items()}
            if "step" in self.state[p]:  # a step count on the device (older checkpoints kept it on the host)
                self.state[p]["step"] = torch.as_tensor(self.state[p]["step"], dtype=torch.float32, device=p.device)
        self._load_extra_state(state_dict.get("control_variate", {}))
