"""The VampPrior -log p(z) as torch custom ops (C++/CUDA/Triton kernels).

Inputs reach these ops checked, in one dtype and contiguous: z [B, D], mu_k and logvar_k [K, D],
`base` an optional [B] accumulation-type vector added to the result (the wake loss's image term).
The forward saves one accumulation-type statistic per code, the logsumexp over components, and
the backward recomputes the responsibilities from it: nothing of size [B, K] or [B, K, D] is kept.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._backend import kernels_for
from .contract import acc_dtype
from .eager import eager, eager_op


def _fwd(z: Tensor, mu_k: Tensor, logvar_k: Tensor, base: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (log K - lse + base [B] in z's dtype, lse [B] in the accumulation dtype)."""
    return tuple(kernels_for(backend).vamp_fwd(z, mu_k, logvar_k, base))


vamp_prior_op = torch.library.custom_op("ehm_fast::vamp_prior", _fwd, mutates_args=())


@vamp_prior_op.register_fake
def _(z, mu_k, logvar_k, base, backend):
    return z.new_empty(z.shape[0]), z.new_empty(z.shape[0], dtype=acc_dtype(z.dtype))


def vamp_prior_bwd_impl(
    grad: Tensor,
    z: Tensor,
    mu_k: Tensor,
    logvar_k: Tensor,
    lse: Tensor,
    need_z: bool,
    need_mu: bool,
    need_logvar: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_z, grad_mu_k, grad_logvar_k); an unneeded one is an empty tensor."""
    return tuple(kernels_for(backend).vamp_bwd(grad, z, mu_k, logvar_k, lse, need_z, need_mu, need_logvar))


vamp_prior_bwd = torch.library.custom_op("ehm_fast::vamp_prior_bwd", vamp_prior_bwd_impl, mutates_args=())


@vamp_prior_bwd.register_fake
def _(grad, z, mu_k, logvar_k, lse, need_z, need_mu, need_logvar, backend):
    return (
        torch.empty_like(z) if need_z else z.new_empty(0),
        torch.empty_like(mu_k) if need_mu else z.new_empty(0),
        torch.empty_like(mu_k) if need_logvar else z.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    z, mu_k, logvar_k, base, backend = inputs
    ctx.save_for_backward(z, mu_k, logvar_k, output[1])
    ctx.backend = backend


def _backward(ctx, grad_out, _grad_lse):
    z, mu_k, logvar_k, lse = ctx.saved_tensors
    need_z, need_mu, need_lv, need_base = ctx.needs_input_grad[:4]
    gz = gmu = glv = None
    if need_z or need_mu or need_lv:
        bwd = vamp_prior_bwd_impl if eager(ctx) else vamp_prior_bwd
        gz, gmu, glv = bwd(grad_out, z, mu_k, logvar_k, lse, need_z, need_mu, need_lv, ctx.backend)
    grad_base = grad_out.to(lse.dtype) if need_base else None
    return (gz if need_z else None), (gmu if need_mu else None), (glv if need_lv else None), grad_base, None


vamp_prior_op.register_autograd(_backward, setup_context=_setup_context)
vamp_prior = eager_op(vamp_prior_op, _fwd, _setup_context, _backward)
