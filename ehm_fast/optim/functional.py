"""In-place control-variate updates over lists of tensors: the kernels behind SVRG and STORM.

    v = (g - alpha * g_ref) + alpha * anchor

is fed to Adam/AdamW or SGD exactly as torch.optim feeds a gradient (coupled or decoupled weight
decay, bias corrections, SGD's first-step momentum buffer). alpha = 1 with anchor = mu_snap is
SVRG, alpha = 1 - a with anchor = v_{t-1} is STORM, and ref_grads = anchors = None is the plain
optimizer. Parameters, gradients and reference gradients share the parameter dtype; anchors,
optimizer state and out_directions are fp32 (fp64 for fp64 parameters).

Every argument is checked before any tensor is touched; the lists are then split into buckets of
one (device, dtype), each updated by one call of the chosen backend (one kernel launch on the GPU
for up to a few dozen tensors, a single launch with Triton).

No host synchronisation: Adam's `step` may be a list of step-count tensors (0-d float32, one per
parameter on its device, holding the count after this update), and with `found_inf` (a one-element
float32 tensor on the parameters' device) nothing changes where it is nonzero, as torch's fused
Adam does with GradScaler's flag. Both are read by the kernels, so an update can be captured in a
CUDA graph.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .._backend import kernels_for, resolve
from ..ops.contract import acc_dtype as state_dtype  # the optimizer state's dtype: one rule for every op
from . import reference

TensorList = Sequence[Tensor]
_DENSE_FORMATS = (torch.contiguous_format, torch.channels_last, torch.channels_last_3d)


def _impl(backend: str):
    return reference if backend == "torch" else kernels_for(backend)


def _dense(t: Tensor) -> bool:
    return t.numel() == 0 or any(t.is_contiguous(memory_format=f) for f in _DENSE_FORMATS if t.dim() >= _min_dim(f))


def _min_dim(fmt: torch.memory_format) -> int:
    return {torch.channels_last: 4, torch.channels_last_3d: 5}.get(fmt, 0)


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.numel() == 0 or all(s == 1 or sa == sb for s, sa, sb in zip(a.shape, a.stride(), b.stride()))


def _check_scalar(name: str, value: float, low: float = 0.0, high: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not value >= low or (high is not None and not value < high):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")


def _matching(items: TensorList, dtypes: list, shapes: list, devices: list, strides: list) -> bool:
    """The fast path (a few list comprehensions, not a Python call per tensor): every entry is a
    strided tensor with exactly its parameter's dtype, shape, device and strides."""
    try:
        return ([x.dtype for x in items] == dtypes and [x.shape for x in items] == shapes
                and [x.device for x in items] == devices and [x.stride() for x in items] == strides
                and all(x.layout == torch.strided for x in items))
    except AttributeError:  # an entry that is not a tensor: the full check names it
        return False


def _check_lists(lists: dict[str, Optional[TensorList]]) -> tuple[list[Tensor], set[str]]:
    """Checks every list against `params`; returns params as a list and the names of the lists
    whose tensors have exactly their parameter's strides (no layout check needed for those)."""
    params = lists["params"]
    if isinstance(params, Tensor) or not isinstance(params, (list, tuple)):
        raise TypeError("params must be a list or tuple of tensors")
    params = list(params)
    if lists.get("ref_grads") is None and lists.get("anchors") is not None or (
            lists.get("ref_grads") is not None and lists.get("anchors") is None):
        raise ValueError("ref_grads and anchors are given together (a control variate) or both None (plain gradient)")
    exact: set[str] = set()
    if all(isinstance(p, Tensor) and p.layout == torch.strided and p.dtype.is_floating_point for p in params):
        exact.add("params")
        dtypes = [p.dtype for p in params]
        state = [state_dtype(d) for d in dtypes]
        shapes, devices, strides = [p.shape for p in params], [p.device for p in params], [p.stride() for p in params]
    for name, items in lists.items():
        if items is None:
            continue
        if isinstance(items, Tensor) or not isinstance(items, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors")
        if len(items) != len(params):
            raise ValueError(f"{name} has {len(items)} tensors, params has {len(params)}")
        if name == "params" and "params" in exact:
            continue
        if "params" in exact and _matching(items, dtypes if name in ("grads", "ref_grads") else state, shapes,
                                           devices, strides):
            exact.add(name)
            continue
        for i, (x, p) in enumerate(zip(items, params)):
            where = f"{name}[{i}]"
            if x is None and name == "momentum_buffers":
                continue  # allocated on the first step, as torch.optim.SGD does
            if not isinstance(x, Tensor):
                raise TypeError(f"{where} must be a tensor, got {type(x).__name__}")
            if x.is_sparse or x.layout != torch.strided:
                raise TypeError(f"{where} is {x.layout}: the control-variate updates take dense tensors only")
            if name == "params":
                if not x.dtype.is_floating_point:
                    raise TypeError(f"{where} must have a floating-point dtype, got {x.dtype}")
                continue
            want = p.dtype if name in ("grads", "ref_grads") else state_dtype(p.dtype)
            if x.dtype != want:
                raise TypeError(f"{where} must be {want} (params[{i}] is {p.dtype}), got {x.dtype}")
            if x.shape != p.shape:
                raise ValueError(f"{where} must have the shape of params[{i}] {tuple(p.shape)}, got {tuple(x.shape)}")
            if x.device != p.device:
                raise ValueError(f"{where} is on {x.device} but params[{i}] is on {p.device}")
    return params, exact


def _buckets(params: list[Tensor], backend: Optional[str], lists: dict[str, Optional[TensorList]], exact: set[str],
             extras: Optional[list] = None) -> list[tuple[str, list[int]]]:
    """Indices per (device, dtype, extras[i]) bucket with the concrete backend of each; checks that
    the compiled kernels can walk every tensor in memory order (dense, same strides as its
    parameter; the lists in `exact` have their parameters' strides already)."""
    keys = list(zip([p.device for p in params], [p.dtype for p in params], extras or [None] * len(params)))
    groups: dict[tuple, list[int]] = defaultdict(list)
    if keys and keys.count(keys[0]) == len(keys):  # the usual case: one bucket
        groups[keys[0]] = list(range(len(keys)))
    else:
        for i, key in enumerate(keys):
            groups[key].append(i)
    plan = []
    for (device, _, _), idx in groups.items():
        name = resolve(backend, device)
        if name != "torch":
            if not all(params[i].is_contiguous() for i in idx):
                for i in idx:
                    if not _dense(params[i]):
                        raise ValueError(f"params[{i}] must be dense for the {name!r} backend; use "
                                         f"backend='torch' for other layouts")
            others = [(k, items) for k, items in lists.items() if items is not None and k not in exact]
            for i in idx:
                for list_name, items in others:
                    x = items[i]
                    if x is None:
                        continue
                    if not _dense(x) or not _same_layout(x, params[i]):
                        raise ValueError(f"{list_name}[{i}] must be dense with the strides of params[{i}] for the "
                                         f"{name!r} backend; use backend='torch' for other layouts")
        plan.append((name, idx))
    return plan


def _pick(items: Optional[TensorList], idx: list[int]) -> list[Tensor]:
    return [] if items is None else [items[i] for i in idx]


def cv_adam_(params: TensorList, grads: TensorList, ref_grads: Optional[TensorList], anchors: Optional[TensorList],
             exp_avgs: TensorList, exp_avg_sqs: TensorList, *, alpha: float, step: int | TensorList, lr: float,
             beta1: float, beta2: float, eps: float, weight_decay: float = 0.0, decoupled: bool = False,
             out_directions: Optional[TensorList] = None, found_inf: Optional[Tensor] = None,
             backend: Optional[str] = None) -> None:
    """Adam (decoupled=False) or AdamW (decoupled=True) on v = (g - alpha g_ref) + alpha anchor, in place.

    `step` is the step number after this update (1 on the first call), as torch.optim.Adam counts:
    an int, or one step-count tensor per parameter (read on the device). out_directions (optional,
    may alias anchors) receives v. Where `found_inf` is nonzero nothing changes.
    """
    plan_adam(params, grads, ref_grads, anchors, exp_avgs, exp_avg_sqs, alpha=alpha, step=step, lr=lr, beta1=beta1,
              beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, out_directions=out_directions,
              found_inf=found_inf, backend=backend)()


def cv_sgd_(params: TensorList, grads: TensorList, ref_grads: Optional[TensorList], anchors: Optional[TensorList],
            momentum_buffers: Optional[list], *, alpha: float, lr: float, momentum: float = 0.0,
            dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
            out_directions: Optional[TensorList] = None, found_inf: Optional[Tensor] = None,
            backend: Optional[str] = None) -> None:
    """SGD (momentum, dampening, Nesterov, weight decay) on v = (g - alpha g_ref) + alpha anchor, in place.

    With momentum != 0, a None entry of `momentum_buffers` (a list) is replaced by a new buffer
    initialised to the direction, as torch.optim.SGD does on its first step; the list is updated
    in place. out_directions (optional, may alias anchors) receives v. Where `found_inf` is
    nonzero nothing changes (a new momentum buffer is then left uninitialised: skip such a step on
    the host instead).
    """
    plan_sgd(params, grads, ref_grads, anchors, momentum_buffers, alpha=alpha, lr=lr, momentum=momentum,
             dampening=dampening, nesterov=nesterov, weight_decay=weight_decay, out_directions=out_directions,
             found_inf=found_inf, backend=backend)()


def _run_all(launches: list[Callable[[], None]]) -> Callable[[], None]:
    @torch.no_grad()
    def run() -> None:
        for launch in launches:
            launch()

    return run


def _check_found(found_inf: Optional[Tensor], params: list[Tensor]) -> None:
    if found_inf is None:
        return
    if not isinstance(found_inf, Tensor) or found_inf.numel() != 1 or found_inf.dtype != torch.float32:
        raise TypeError("found_inf must be a one-element float32 tensor (nonzero: skip the step)")
    devices = {p.device for p in params}
    if devices and devices != {found_inf.device}:
        raise ValueError(f"found_inf is on {found_inf.device} but the parameters are on {sorted(map(str, devices))}")


def _check_steps(step: int | TensorList, params: list[Tensor]) -> Optional[list[Tensor]]:
    """None for an int step (checked), else the list of step-count tensors (checked)."""
    if isinstance(step, (list, tuple)):
        if len(step) != len(params):
            raise ValueError(f"step has {len(step)} tensors, params has {len(params)}")
        for i, (t, p) in enumerate(zip(step, params)):
            if not isinstance(t, Tensor) or t.dim() != 0 or t.dtype != torch.float32 or t.device != p.device:
                raise TypeError(f"step[{i}] must be a 0-d float32 tensor on {p.device} (params[{i}]'s device)")
        return list(step)
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step must be an int >= 1 (the step count after this update) or a list of step-count "
                         f"tensors, got {step!r}")
    return None


def plan_adam(params: TensorList, grads: TensorList, ref_grads: Optional[TensorList], anchors: Optional[TensorList],
              exp_avgs: TensorList, exp_avg_sqs: TensorList, *, alpha: float, step: int | TensorList, lr: float,
              beta1: float, beta2: float, eps: float, weight_decay: float = 0.0, decoupled: bool = False,
              out_directions: Optional[TensorList] = None, found_inf: Optional[Tensor] = None,
              backend: Optional[str] = None) -> Callable[[], None]:
    """Checks every argument of cv_adam_ and returns the update, not yet run (so an optimizer can
    check all its groups before touching any tensor)."""
    lists = {"params": params, "grads": grads, "ref_grads": ref_grads, "anchors": anchors, "exp_avgs": exp_avgs,
             "exp_avg_sqs": exp_avg_sqs, "out_directions": out_directions}
    params, exact = _check_lists(lists)
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        _check_scalar(name, value)
    _check_scalar("beta1", beta1, 0.0, 1.0)
    _check_scalar("beta2", beta2, 0.0, 1.0)
    _check_scalar("alpha", alpha, float("-inf"))
    steps = _check_steps(step, params)
    _check_found(found_inf, params)
    scalars = (float(alpha), 1 if steps else step, float(lr), float(beta1), float(beta2), float(eps),
               float(weight_decay), bool(decoupled))
    launches = []
    for name, idx in _buckets(params, backend, lists, exact):
        tensors = [_pick(lists[k], idx) for k in lists]
        launches.append(lambda fn=_impl(name).cv_adam_, tensors=tensors, counts=_pick(steps, idx):
                        fn(*tensors, *scalars, counts, found_inf))
    return _run_all(launches)


def plan_sgd(params: TensorList, grads: TensorList, ref_grads: Optional[TensorList], anchors: Optional[TensorList],
             momentum_buffers: Optional[list], *, alpha: float, lr: float, momentum: float = 0.0,
             dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
             out_directions: Optional[TensorList] = None, found_inf: Optional[Tensor] = None,
             backend: Optional[str] = None) -> Callable[[], None]:
    """Checks every argument of cv_sgd_ and returns the update, not yet run. New momentum buffers
    are put in `momentum_buffers` here (uninitialised until the update runs)."""
    for name, value in (("lr", lr), ("momentum", momentum), ("dampening", dampening),
                        ("weight_decay", weight_decay)):
        _check_scalar(name, value)
    _check_scalar("alpha", alpha, float("-inf"))
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening = 0")
    has_buf = momentum != 0
    if has_buf and not isinstance(momentum_buffers, list):
        raise TypeError("momentum_buffers must be a list (None entries get new buffers) when momentum != 0")
    lists = {"params": params, "grads": grads, "ref_grads": ref_grads, "anchors": anchors,
             "momentum_buffers": momentum_buffers if has_buf else None, "out_directions": out_directions}
    params, exact = _check_lists(lists)
    _check_found(found_inf, params)
    new = [has_buf and momentum_buffers[i] is None for i in range(len(params))]
    plan = _buckets(params, backend, lists, exact, new)
    if has_buf:
        for i, p in enumerate(params):
            if new[i]:
                momentum_buffers[i] = torch.empty_like(p, dtype=state_dtype(p.dtype))
    scalars = (float(alpha), float(lr), float(momentum), float(dampening), float(weight_decay), bool(nesterov))
    launches = []
    for name, idx in plan:
        tensors = [_pick(lists[k], idx) for k in lists]
        first = new[idx[0]]
        launches.append(lambda fn=_impl(name).cv_sgd_, tensors=tensors, first=first:
                        fn(*tensors, *scalars, first, found_inf))
    return _run_all(launches)
