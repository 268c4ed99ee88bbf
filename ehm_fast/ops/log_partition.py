"""The importance-weighted log-partition estimate as torch custom ops (C++/CUDA/Triton kernels).

Inputs reach these ops already checked, broadcast and flattened to contiguous [R, M] rows.
The forward saves one fp32 (fp64 for fp64 inputs) statistic per row, the row's logsumexp,
and the backward recomputes the weights exp(z - lse) from it (the flash-attention scheme).
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._backend import kernels_for
from .contract import acc_dtype
from .eager import eager, eager_op


def _fwd(scores: Tensor, log_proposal: Optional[Tensor], jensen: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (estimate [R] in the input dtype, lse [R] in the accumulation dtype)."""
    return tuple(kernels_for(backend).log_partition_fwd(scores, log_proposal, jensen))


log_partition_fwd = torch.library.custom_op("ehm_fast::log_partition_fwd", _fwd, mutates_args=())


@log_partition_fwd.register_fake
def _(scores, log_proposal, jensen, backend):
    rows = scores.shape[0]
    return scores.new_empty(rows), scores.new_empty(rows, dtype=acc_dtype(scores.dtype))


def _bwd(
    grad: Tensor,
    scores: Tensor,
    log_proposal: Optional[Tensor],
    lse: Tensor,
    jensen: bool,
    need_scores: bool,
    need_proposal: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """Returns (grad_scores, grad_log_proposal); an unneeded one is an empty tensor."""
    return tuple(kernels_for(backend).log_partition_bwd(grad, scores, log_proposal, lse, jensen, need_scores, need_proposal))


log_partition_bwd = torch.library.custom_op("ehm_fast::log_partition_bwd", _bwd, mutates_args=())


@log_partition_bwd.register_fake
def _(grad, scores, log_proposal, lse, jensen, need_scores, need_proposal, backend):
    gs = torch.empty_like(scores) if need_scores else scores.new_empty(0)
    gp = torch.empty_like(scores) if need_proposal else scores.new_empty(0)
    return gs, gp


def _setup_context(ctx, inputs, output):
    scores, log_proposal, jensen, backend = inputs
    ctx.save_for_backward(scores, log_proposal, output[1])
    ctx.jensen, ctx.backend = jensen, backend


def _backward(ctx, grad_out, _grad_lse):
    scores, log_proposal, lse = ctx.saved_tensors
    need_s, need_p = ctx.needs_input_grad[0], log_proposal is not None and ctx.needs_input_grad[1]
    bwd = _bwd if eager(ctx) else log_partition_bwd
    gs, gp = bwd(grad_out.contiguous(), scores, log_proposal, lse, ctx.jensen, need_s, need_p, ctx.backend)
    return (gs if need_s else None), (gp if need_p else None), None, None


log_partition_fwd.register_autograd(_backward, setup_context=_setup_context)
log_partition = eager_op(log_partition_fwd, _fwd, _setup_context, _backward)
