"""The per-sample likelihood terms and the fused wake loss as torch custom ops.

Inputs reach these ops checked, in one dtype and as contiguous rows: images [B, d] with log_scale
expanded to one image (a [d] vector in the accumulation dtype, None for Bernoulli), codes [B, D].
`image_nll` returns the accumulation dtype (the caller reduces and casts); `code_nll` returns the
inputs' dtype and adds an optional accumulation-type `base` [B] (the sleep loss passes -f(x~)).
`wake` is the wake-phase loss in one call: the image kernel's per-sample sums become the `base`
of the code kernel (standard normal or VampPrior), so no extra elementwise pass runs.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._backend import kernels_for
from .contract import STD_NORMAL, acc_dtype
from .eager import eager, eager_op
from .vamp import vamp_prior_bwd, vamp_prior_bwd_impl


def _image_fwd(x: Tensor, mean: Tensor, log_scale: Optional[Tensor], kind: int, backend: str) -> Tensor:
    """-log p(x_b | mean_b) per row [B], in the accumulation dtype."""
    return kernels_for(backend).image_nll_fwd(x, mean, log_scale, kind)


image_nll_op = torch.library.custom_op("ehm_fast::image_nll", _image_fwd, mutates_args=())


@image_nll_op.register_fake
def _(x, mean, log_scale, kind, backend):
    return x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype))


def _image_bwd(
    grad: Tensor,
    x: Tensor,
    mean: Tensor,
    log_scale: Optional[Tensor],
    kind: int,
    need_x: bool,
    need_mean: bool,
    need_scale: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_x, grad_mean, grad_log_scale [d]); an unneeded one is an empty tensor."""
    return tuple(kernels_for(backend).image_nll_bwd(grad, x, mean, log_scale, kind, need_x, need_mean, need_scale))


image_nll_bwd = torch.library.custom_op("ehm_fast::image_nll_bwd", _image_bwd, mutates_args=())


@image_nll_bwd.register_fake
def _(grad, x, mean, log_scale, kind, need_x, need_mean, need_scale, backend):
    acc = acc_dtype(x.dtype)
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(x) if need_mean else x.new_empty(0),
        x.new_empty(x.shape[1] if need_scale and log_scale is not None else 0, dtype=acc),
    )


def _image_grads(ctx, grad, x, mean, log_scale, needs) -> Tuple[Optional[Tensor], ...]:
    need_x, need_mean, need_scale = needs
    need_scale = need_scale and log_scale is not None
    if not (need_x or need_mean or need_scale):
        return None, None, None
    bwd = _image_bwd if eager(ctx) else image_nll_bwd
    gx, gm, gs = bwd(grad, x, mean, log_scale, ctx.kind, need_x, need_mean, need_scale, ctx.backend)
    return (gx if need_x else None), (gm if need_mean else None), (gs if need_scale else None)


def _image_setup(ctx, inputs, output):
    x, mean, log_scale, kind, backend = inputs
    ctx.save_for_backward(x, mean, log_scale)
    ctx.kind, ctx.backend = kind, backend


def _image_backward(ctx, grad_out):
    x, mean, log_scale = ctx.saved_tensors
    return (*_image_grads(ctx, grad_out, x, mean, log_scale, ctx.needs_input_grad[:3]), None, None)


image_nll_op.register_autograd(_image_backward, setup_context=_image_setup)
image_nll = eager_op(image_nll_op, _image_fwd, _image_setup, _image_backward)


def _code_fwd(
    a: Tensor, b: Optional[Tensor], c: Optional[Tensor], e: Optional[Tensor], base: Optional[Tensor], kind: int, backend: str
) -> Tensor:
    """Sum over each row of the code term `kind` (+ base) [B], in the inputs' dtype."""
    return kernels_for(backend).code_nll_fwd(a, b, c, e, base, kind)


code_nll_op = torch.library.custom_op("ehm_fast::code_nll", _code_fwd, mutates_args=())


@code_nll_op.register_fake
def _(a, b, c, e, base, kind, backend):
    return a.new_empty(a.shape[0])


def _code_bwd(
    grad: Tensor,
    a: Tensor,
    b: Optional[Tensor],
    c: Optional[Tensor],
    e: Optional[Tensor],
    kind: int,
    need_a: bool,
    need_b: bool,
    need_c: bool,
    need_e: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns the gradients of the four operands; an unneeded or absent one is an empty tensor."""
    return tuple(kernels_for(backend).code_nll_bwd(grad, a, b, c, e, kind, need_a, need_b, need_c, need_e))


code_nll_bwd = torch.library.custom_op("ehm_fast::code_nll_bwd", _code_bwd, mutates_args=())


@code_nll_bwd.register_fake
def _(grad, a, b, c, e, kind, need_a, need_b, need_c, need_e, backend):
    present = (True, b is not None, c is not None, e is not None)
    needs = (need_a, need_b, need_c, need_e)
    return tuple(torch.empty_like(a) if n and p else a.new_empty(0) for n, p in zip(needs, present))


def _code_grads(ctx, grad, operands, needs, kind) -> Tuple[Optional[Tensor], ...]:
    a, b, c, e = operands
    needs = tuple(n and t is not None for n, t in zip(needs, operands))
    if not any(needs):
        return None, None, None, None
    bwd = _code_bwd if eager(ctx) else code_nll_bwd
    grads = bwd(grad, a, b, c, e, kind, *needs, ctx.backend)
    return tuple(g if n else None for g, n in zip(grads, needs))


def _code_setup(ctx, inputs, output):
    a, b, c, e, base, kind, backend = inputs
    ctx.save_for_backward(a, b, c, e)
    ctx.kind, ctx.backend = kind, backend
    ctx.base_dtype = None if base is None else base.dtype


def _code_backward(ctx, grad_out):
    grads = _code_grads(ctx, grad_out, ctx.saved_tensors, ctx.needs_input_grad[:4], ctx.kind)
    grad_base = grad_out.to(ctx.base_dtype) if ctx.needs_input_grad[4] else None
    return (*grads, grad_base, None, None)


code_nll_op.register_autograd(_code_backward, setup_context=_code_setup)
code_nll = eager_op(code_nll_op, _code_fwd, _code_setup, _code_backward)


def _wake_fwd(
    x: Tensor,
    mean: Tensor,
    log_scale: Optional[Tensor],
    kind: int,
    z: Tensor,
    mu_k: Optional[Tensor],
    logvar_k: Optional[Tensor],
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """-log p(x|z) - log p(z) per sample [B] in z's dtype, and the VampPrior's lse (empty for N(0, I))."""
    kernels = kernels_for(backend)
    rec = kernels.image_nll_fwd(x, mean, log_scale, kind)
    if mu_k is None:
        return kernels.code_nll_fwd(z, None, None, None, rec, STD_NORMAL), rec.new_empty(0)
    return tuple(kernels.vamp_fwd(z, mu_k, logvar_k, rec))


wake_op = torch.library.custom_op("ehm_fast::wake", _wake_fwd, mutates_args=())


@wake_op.register_fake
def _(x, mean, log_scale, kind, z, mu_k, logvar_k, backend):
    acc = acc_dtype(z.dtype)
    return z.new_empty(z.shape[0]), z.new_empty(0 if mu_k is None else z.shape[0], dtype=acc)


def _wake_setup(ctx, inputs, output):
    x, mean, log_scale, kind, z, mu_k, logvar_k, backend = inputs
    ctx.save_for_backward(x, mean, log_scale, z, mu_k, logvar_k, output[1])
    ctx.kind, ctx.backend = kind, backend


def _wake_backward(ctx, grad_out, _grad_lse):
    x, mean, log_scale, z, mu_k, logvar_k, lse = ctx.saved_tensors
    needs = ctx.needs_input_grad
    image = _image_grads(ctx, grad_out, x, mean, log_scale, needs[:3])
    gz = gmu = glv = None
    if mu_k is None:
        gz = _code_grads(ctx, grad_out, (z, None, None, None), (needs[4], False, False, False), STD_NORMAL)[0]
    elif needs[4] or needs[5] or needs[6]:
        bwd = vamp_prior_bwd_impl if eager(ctx) else vamp_prior_bwd
        gz, gmu, glv = bwd(grad_out, z, mu_k, logvar_k, lse, needs[4], needs[5], needs[6], ctx.backend)
    keep = lambda g, need: g if need else None  # noqa: E731
    return (*image, None, keep(gz, needs[4]), keep(gmu, needs[5]), keep(glv, needs[6]), None)


wake_op.register_autograd(_wake_backward, setup_context=_wake_setup)
wake = eager_op(wake_op, _wake_fwd, _wake_setup, _wake_backward)
