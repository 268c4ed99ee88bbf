"""The for-loop reference of the control-variate updates: the "torch" backend and the tests' oracle.

Same names and signatures as the kernels' (`ehm_fast._C.cv_adam_`, `ehm_fast.kernels.cv_adam_`):
one bucket of tensors, empty lists for absent ones. Each tensor is updated with torch ops in the
state dtype (fp32 for fp16/bf16/fp32 parameters) in torch.optim's operation order, and the
parameter is rounded to its dtype once at the end, as the fused kernels do.

`steps` (one 0-d tensor per parameter, the count after this update; empty: the host `step`) and
`found_inf` (a 0-d tensor; nothing changes where it is nonzero) stay on the device: no value is
read on the host, so the update can run inside a CUDA graph.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..ops.contract import acc_dtype


def _direction(g: Tensor, ref: Tensor | None, anchor: Tensor | None, alpha: float, dtype: torch.dtype) -> Tensor:
    """v = (g - alpha g_ref) + alpha anchor: exactly g without a control variate, exactly the anchor
    when g == g_ref and alpha == 1."""
    g = g.to(dtype)
    if ref is None:
        return g.clone()
    return (g - ref.to(dtype) * alpha) + anchor * alpha


def _param_in(p: Tensor, dtype: torch.dtype) -> Tensor:
    return p.detach().to(dtype, copy=True)


def copy_unless(found_inf: Tensor | None, target: Tensor, new: Tensor) -> Tensor:
    """target <- new, or unchanged where found_inf (a device flag) is nonzero; returns target."""
    with torch.no_grad():
        return target.copy_(new if found_inf is None else torch.where(found_inf != 0, target, new.to(target.dtype)))


def _commit(found_inf: Tensor | None, pairs: list[tuple[Tensor, Tensor]]) -> None:
    for target, new in pairs:
        copy_unless(found_inf, target, new)


def _bias_corrections(beta1: float, beta2: float, step: int, count: Tensor | None,
                      dtype: torch.dtype) -> tuple[float | Tensor, float | Tensor]:
    """(1 - beta1^t, sqrt(1 - beta2^t)) in double, as torch.optim.Adam computes them: host numbers
    for the host step, 0-d tensors on the device for a step-count tensor."""
    if count is None:
        return 1 - beta1 ** float(step), (1 - beta2 ** float(step)) ** 0.5
    t = count.to(torch.float64)
    return (1 - torch.pow(beta1, t)).to(dtype), (1 - torch.pow(beta2, t)).sqrt().to(dtype)


@torch.no_grad()
def cv_adam_(params: Sequence[Tensor], grads: Sequence[Tensor], ref_grads: Sequence[Tensor],
             anchors: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
             directions: Sequence[Tensor], alpha: float, step: int, lr: float, beta1: float, beta2: float,
             eps: float, weight_decay: float, decoupled: bool, steps: Sequence[Tensor],
             found_inf: Tensor | None) -> None:
    for i, p in enumerate(params):
        m, v2 = exp_avgs[i].clone(), exp_avg_sqs[i].clone()
        bias_correction1, bias_correction2_sqrt = _bias_corrections(beta1, beta2, step, steps[i] if steps else None,
                                                                    m.dtype)
        param = _param_in(p, m.dtype)
        d = _direction(grads[i], ref_grads[i] if ref_grads else None, anchors[i] if anchors else None, alpha, m.dtype)
        updates = [(directions[i], d)] if directions else []
        if weight_decay != 0:
            if decoupled:
                param.mul_(1 - lr * weight_decay)
            else:
                d = d.add(param, alpha=weight_decay)
        m.lerp_(d, 1 - beta1)
        v2.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        denom = (v2.sqrt() / bias_correction2_sqrt).add_(eps)
        if steps:  # addcdiv takes a number: (-step_size * m) / denom is its rounding
            param.add_((m * (-lr / bias_correction1)) / denom)
        else:
            param.addcdiv_(m, denom, value=-lr / bias_correction1)
        _commit(found_inf, updates + [(exp_avgs[i], m), (exp_avg_sqs[i], v2), (p, param)])


@torch.no_grad()
def cv_sgd_(params: Sequence[Tensor], grads: Sequence[Tensor], ref_grads: Sequence[Tensor],
            anchors: Sequence[Tensor], momentum_buffers: Sequence[Tensor], directions: Sequence[Tensor],
            alpha: float, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
            first: bool, found_inf: Tensor | None) -> None:
    state_dtype = acc_dtype(params[0].dtype) if params else torch.float32
    for i, p in enumerate(params):
        param = _param_in(p, state_dtype)
        d = _direction(grads[i], ref_grads[i] if ref_grads else None, anchors[i] if anchors else None, alpha,
                       state_dtype)
        updates = [(directions[i], d)] if directions else []
        if weight_decay != 0:
            d = d.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = d.clone() if first else momentum_buffers[i].mul(momentum).add_(d, alpha=1 - dampening)
            updates.append((momentum_buffers[i], buf))
            d = d.add(buf, alpha=momentum) if nesterov else buf
        param.add_(d, alpha=-lr)
        _commit(found_inf, updates + [(p, param)])
