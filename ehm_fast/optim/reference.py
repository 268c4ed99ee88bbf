"""The for-loop reference of the control-variate updates: the "torch" backend and the tests' oracle.

Same names and signatures as the kernels' (`ehm_fast._C.cv_adam_`, `ehm_fast.kernels.cv_adam_`):
one bucket of tensors, empty lists for absent ones. Each tensor is updated with torch ops in the
state dtype (fp32 for fp16/bf16/fp32 parameters) in torch.optim's operation order, and the
parameter is rounded to its dtype once at the end, as the fused kernels do.
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


@torch.no_grad()
def cv_adam_(params: Sequence[Tensor], grads: Sequence[Tensor], ref_grads: Sequence[Tensor],
             anchors: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
             directions: Sequence[Tensor], alpha: float, step: int, lr: float, beta1: float, beta2: float,
             eps: float, weight_decay: float, decoupled: bool) -> None:
    bias_correction1 = 1 - beta1 ** float(step)
    bias_correction2_sqrt = (1 - beta2 ** float(step)) ** 0.5
    step_size = lr / bias_correction1
    for i, p in enumerate(params):
        m, v2 = exp_avgs[i], exp_avg_sqs[i]
        param = _param_in(p, m.dtype)
        d = _direction(grads[i], ref_grads[i] if ref_grads else None, anchors[i] if anchors else None, alpha, m.dtype)
        if directions:
            directions[i].copy_(d)
        if weight_decay != 0:
            if decoupled:
                param.mul_(1 - lr * weight_decay)
            else:
                d = d.add(param, alpha=weight_decay)
        m.lerp_(d, 1 - beta1)
        v2.mul_(beta2).addcmul_(d, d, value=1 - beta2)
        denom = (v2.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(m, denom, value=-step_size)
        p.copy_(param)


@torch.no_grad()
def cv_sgd_(params: Sequence[Tensor], grads: Sequence[Tensor], ref_grads: Sequence[Tensor],
            anchors: Sequence[Tensor], momentum_buffers: Sequence[Tensor], directions: Sequence[Tensor],
            alpha: float, lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
            first: bool) -> None:
    state_dtype = acc_dtype(params[0].dtype) if params else torch.float32
    for i, p in enumerate(params):
        param = _param_in(p, state_dtype)
        d = _direction(grads[i], ref_grads[i] if ref_grads else None, anchors[i] if anchors else None, alpha,
                       state_dtype)
        if directions:
            directions[i].copy_(d)
        if weight_decay != 0:
            d = d.add(param, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first:
                buf.copy_(d)
            else:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        param.add_(d, alpha=-lr)
        p.copy_(param)
