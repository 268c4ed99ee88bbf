"""Bias + activation as one op whose derivatives of every order reach only what they depend on.

    y  = act(x + b)                     _BiasAct
    gx = gy * act'(y)                   _BiasActGrad: a function of (gy, y), never of x
    d gx / d gy = _BiasActGrad again;   d gx / d y = None for linear, relu and lrelu, whose act'
                                        is piecewise constant, and -2 y gy for tanh

Autograd's own leaky_relu_backward is a function of (gy, x) whose derivative w.r.t. x is
zeros_like(gy): in the gradient penalty's double backward autograd carries those zeros into the
activation's node and from there through the convolution below it, kernels that multiply zeros.
Here that derivative is None and y enters _BiasActGrad detached, so no edge exists to carry
anything (NVlabs/stylegan3's bias_act builds the same chain). Both Functions leave undefined
incoming gradients undefined instead of materialising zeros.

Two implementations, chosen by ehm_fast._backend.resolve_layer: "triton" (kernels in
ehm_fast.kernels.bias_act, called through their custom ops under torch.compile and directly
otherwise, see ehm_fast.ops.eager) and "torch", plain torch formulas inside the same Functions.
`bias_act_reference` is act(x + b) under plain autograd: the oracle of both.
"""

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import resolve_layer
from ..ops.contract import memory_format_of
from ._graph import gradient_nodes, needed, trackable

ACTIVATIONS = ("linear", "relu", "lrelu", "tanh")
_CURVED = ("tanh",)  # act'(y) varies with y: the only activations whose gx has a y-derivative


def _kernels() -> Any:
    """The Triton kernels, imported on first use: the torch path must not need triton."""
    from ehm_fast.kernels import bias_act

    return bias_act


def _per_channel(b: Tensor, x: Tensor) -> Tensor:
    return b.to(x.dtype).view(1, -1, *[1] * (x.dim() - 2))


def bias_act_reference(x: Tensor, bias: Optional[Tensor] = None, *, activation: str = "linear",
                       slope: float = 0.2) -> Tensor:
    """act(x + bias) in plain torch ops, differentiable to any order by autograd itself."""
    if bias is not None:
        x = x + _per_channel(bias, x)
    if activation == "relu":
        return F.relu(x)
    if activation == "lrelu":
        return F.leaky_relu(x, slope)
    if activation == "tanh":
        return torch.tanh(x)
    return x


def _grad_torch(gy: Tensor, y: Tensor, activation: str, slope: float) -> Tensor:
    """gy * act'(y) for a non-linear activation, deciding at 0 as torch's own backward does."""
    if activation == "relu":
        return gy.masked_fill(y <= 0, 0)
    if activation == "lrelu":
        return torch.where(y > 0, gy, gy * slope)
    acc = torch.promote_types(y.dtype, torch.float32)  # as the kernel: one rounding, at the end
    return (gy.to(acc) * (1 - y.to(acc).square())).to(y.dtype)


# ---------------------------------------------------------------- the Triton path's custom ops


def _fwd_kernel(x: Tensor, bias: Optional[Tensor], activation: str, slope: float) -> Tensor:
    return _kernels().bias_act_fwd(x, bias, activation, slope)


bias_act_fwd = torch.library.custom_op("ehm_fast::bias_act_fwd", _fwd_kernel, mutates_args=())


@bias_act_fwd.register_fake
def _(x, bias, activation, slope):
    return torch.empty_like(x)


def _bwd_kernel(gy: Tensor, y: Tensor, activation: str, slope: float) -> Tensor:
    return _kernels().bias_act_bwd(gy, y, activation, slope)


bias_act_bwd = torch.library.custom_op("ehm_fast::bias_act_bwd", _bwd_kernel, mutates_args=())


@bias_act_bwd.register_fake
def _(gy, y, activation, slope):
    return torch.empty_like(y)


def _fwd(x: Tensor, bias: Optional[Tensor], activation: str, slope: float, impl: str) -> Tensor:
    if impl == "torch":
        return bias_act_reference(x, bias, activation=activation, slope=slope)
    kernel = bias_act_fwd if torch.compiler.is_compiling() else _fwd_kernel
    return kernel(x, bias, activation, slope)


def _bwd(gy: Tensor, y: Tensor, activation: str, slope: float, impl: str) -> Tensor:
    if impl == "torch":
        return _grad_torch(gy, y, activation, slope)
    kernel = bias_act_bwd if torch.compiler.is_compiling() else _bwd_kernel
    return kernel(gy, y, activation, slope)


# ---------------------------------------------------------------- the differentiable structure


class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Optional[Tensor], activation: str, slope: float, impl: str) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.spec = (activation, slope, impl)
        ctx.nodes = gradient_nodes(x, bias)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.reduce_dims = (0, *range(2, x.dim()))
        y = _fwd(x, bias, activation, slope, impl)
        if activation != "linear":
            ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        need_x, need_b = (needed(ctx, i) for i in range(2))
        if gy is None or not (need_x or need_b):
            return None, None, None, None, None
        activation = ctx.spec[0]
        if activation == "linear":
            gx = gy
        else:
            (y,) = ctx.saved_tensors
            gx = _BiasActGrad.apply(gy, y if activation in _CURVED else y.detach(), *ctx.spec)
        gb = gx.sum(ctx.reduce_dims, dtype=ctx.bias_dtype) if need_b else None
        return (gx if need_x else None), gb, None, None, None


class _BiasActGrad(torch.autograd.Function):
    """gx = gy * act'(y); y arrives detached unless the activation is curved."""

    @staticmethod
    def forward(ctx: Any, gy: Tensor, y: Tensor, activation: str, slope: float, impl: str) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.spec = (activation, slope, impl)
        gy = gy.contiguous(memory_format=memory_format_of(y))  # the kernel walks both in y's memory order
        ctx.save_for_backward(gy if activation in _CURVED else None, y)
        return _bwd(gy, y, activation, slope, impl)

    @staticmethod
    def backward(ctx: Any, gg: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        if gg is None:
            return None, None, None, None, None
        gy, y = ctx.saved_tensors
        d_gy = _BiasActGrad.apply(gg, y, *ctx.spec) if ctx.needs_input_grad[0] else None
        d_y = -2 * y * gy * gg if ctx.needs_input_grad[1] else None  # tanh's: the only attached y
        return d_gy, d_y, None, None, None


# ---------------------------------------------------------------- the public API


def _check(x: Tensor, bias: Optional[Tensor], activation: str, slope: float) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "lrelu" and not slope > 0:
        raise ValueError(f"lrelu needs slope > 0 (its backward reads the mask from y's sign), got {slope}")
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"bias_act takes floating-point x of shape [N, C, ...], got {x.dtype} {tuple(x.shape)}")
    if bias is None:
        return
    if bias.shape != (x.shape[1],) or not bias.is_floating_point():
        raise ValueError(f"bias must be floating-point of shape [{x.shape[1]}], got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def bias_act(x: Tensor, bias: Optional[Tensor] = None, *, activation: str = "linear", slope: float = 0.2,
             backend: Optional[str] = None) -> Tensor:
    """act(x + bias.view(1, -1, 1, ...)) in x's dtype and memory format, bias [C] cast to x's
    dtype (its gradient comes back in its own). activation: one of ACTIVATIONS (lrelu is
    leaky_relu with `slope`). Linear without a bias is the identity and returns x itself."""
    _check(x, bias, activation, slope)
    if activation == "linear" and bias is None:
        return x
    impl = resolve_layer(backend, x.device)
    x = x.contiguous(memory_format=memory_format_of(x))
    if not (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _fwd(x, bias, activation, slope, impl)
    return _BiasAct.apply(trackable(x), trackable(bias), activation, slope, impl)
