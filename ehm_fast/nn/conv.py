"""Convolutions whose backward is a function of (incoming gradient, weight) only.

autograd records a convolution's backward as a function of its saved input too. In the gradient
penalty's double backward that input receives the derivative of the activation's mask, exactly zero,
and autograd carries the zero back through the convolution below it: input- and weight-gradient
calls that multiply zeros. Here every direction is its own op with a declared derivative:

    y      = conv(x, w)                          (direct or transposed; geometry G)
    dL/dx  = conv_adjoint(dL/dy, w)              the same op with the adjoint geometry
    dL/dw  = weight_grad(dL/dy, x)               its own op, whose derivatives are
             d/d(dL/dy) = conv(x, gg),   d/dx = conv_adjoint(dL/dy, gg)

so a second derivative reaches only the tensors it depends on (NVlabs/stylegan3's conv2d_gradfix
builds the same chain). A backward also skips the directions the running backward will not use (an
input gradient taken with autograd.grad runs no weight-gradient call), which autograd's own
convolution node does too.

Every sum runs in one of two places, `_apply` (a direct or transposed convolution: forward and
input gradient) and `_weight_grad`, with the kernels named by `Geometry.kernel` (options.CONV_KERNELS):

- "cudnn" (the default): PyTorch's own (cuDNN on a GPU, F.conv2d / conv_transpose2d, which are
  also the reference of the tests);
- "triton": ehm_fast.kernels.conv (implicit-GEMM forward, stride-phase input gradient that is
  also the transposed forward, split-K weight gradient), called through the custom ops
  ehm_fast::conv_fwd / conv_dgrad / conv_wgrad under torch.compile and directly otherwise. The
  chain above is unchanged, so every order of derivative runs these three kernels too.

The kernel is a choice of `Geometry` (frozen, hashable: torch.compile specialises on it) rather
than a lever: a lever is an exact speedup that "all" turns on, and the Triton kernels stay opt-in
until a GPU run shows them faster than cuDNN at the models' shapes (benchmarks/cases_conv.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import resolve
from ..ops.contract import acc_dtype, memory_format_of
from ._graph import gradient_nodes, needed, trackable
from .options import CONV_KERNELS


@dataclass(frozen=True)
class Geometry:
    """stride and padding (the same along both axes), output_padding (height, width) of a
    transposed convolution, and the kernels that run it (one of CONV_KERNELS)."""

    stride: int
    padding: int
    transposed: bool = False
    output_padding: tuple[int, int] = (0, 0)
    kernel: str = "cudnn"

    def adjoint(self, in_size: torch.Size, out_size: torch.Size, kernel: int) -> "Geometry":
        """The geometry of the input gradient: a direct conv's is the transposed conv that maps the
        output size (H, W) back to `in_size` exactly; a transposed conv's is the direct conv."""
        if self.transposed:
            return Geometry(self.stride, self.padding, kernel=self.kernel)
        extra = tuple(i - ((o - 1) * self.stride - 2 * self.padding + kernel) for i, o in zip(in_size, out_size))
        return Geometry(self.stride, self.padding, True, extra, self.kernel)

    def out_size(self, x: Tensor, kernel: int) -> tuple[int, int]:
        """(H, W) of the output for input x."""
        if self.transposed:
            return tuple((i - 1) * self.stride - 2 * self.padding + kernel + p
                         for i, p in zip(x.shape[-2:], self.output_padding))
        return tuple((i + 2 * self.padding - kernel) // self.stride + 1 for i in x.shape[-2:])


# ---------------------------------------------------------------- the Triton kernels' custom ops


def _kernels() -> Any:
    """The Triton kernels, imported on first use: the cuDNN path must not need triton."""
    from ehm_fast.kernels import conv

    return conv


def _fwd_kernel(x: Tensor, w: Tensor, bias: Tensor | None, stride: int, padding: int, activation: str,
                slope: float, stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(act(conv2d(x, w, bias)), mean, M2); the statistics are empty unless `stats`."""
    return _with_stats(_kernels().conv_fwd(x, w, bias, stride, padding, activation, slope, stats), x)


def _dgrad_kernel(dy: Tensor, w: Tensor, bias: Tensor | None, stride: int, padding: int, out_h: int, out_w: int,
                  activation: str, slope: float, stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(act(conv_transpose2d(dy, w, bias)) of size (out_h, out_w), mean, M2)."""
    return _with_stats(_kernels().conv_dgrad(dy, w, bias, stride, padding, (out_h, out_w), activation, slope,
                                             stats), dy)


def _wgrad_kernel(dy: Tensor, x: Tensor, w: Tensor, stride: int, padding: int) -> Tensor:
    return _kernels().conv_wgrad(dy, x, w, stride, padding)


def _with_stats(result: tuple, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    y, mean, m2 = result
    if mean is None:  # a custom op returns tensors only, and none aliasing another
        mean, m2 = (like.new_empty(0, dtype=acc_dtype(like.dtype)) for _ in range(2))
    return y, mean, m2


conv_fwd_op = torch.library.custom_op("ehm_fast::conv_fwd", _fwd_kernel, mutates_args=())
conv_dgrad_op = torch.library.custom_op("ehm_fast::conv_dgrad", _dgrad_kernel, mutates_args=())
conv_wgrad_op = torch.library.custom_op("ehm_fast::conv_wgrad", _wgrad_kernel, mutates_args=())


def _fake(like: Tensor, shape: tuple[int, ...], stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format_of(like))
    n = shape[1] if stats else 0
    return y, like.new_empty(n, dtype=acc_dtype(like.dtype)), like.new_empty(n, dtype=acc_dtype(like.dtype))


@conv_fwd_op.register_fake
def _(x, w, bias, stride, padding, activation, slope, stats):
    size = Geometry(stride, padding).out_size(x, w.shape[-1])
    return _fake(x, (x.shape[0], w.shape[0], *size), stats)


@conv_dgrad_op.register_fake
def _(dy, w, bias, stride, padding, out_h, out_w, activation, slope, stats):
    return _fake(dy, (dy.shape[0], w.shape[1], out_h, out_w), stats)


@conv_wgrad_op.register_fake
def _(dy, x, w, stride, padding):
    return torch.empty_like(w)


def _apply(x: Tensor, w: Tensor, b: Tensor | None, g: Geometry) -> Tensor:
    if g.kernel == "triton":
        compiling = torch.compiler.is_compiling()
        if g.transposed:
            size = g.out_size(x, w.shape[-1])
            dgrad = conv_dgrad_op if compiling else _dgrad_kernel
            return dgrad(x, w, b, g.stride, g.padding, *size, "linear", 0.0, False)[0]
        return (conv_fwd_op if compiling else _fwd_kernel)(x, w, b, g.stride, g.padding, "linear", 0.0, False)[0]
    if g.transposed:
        return F.conv_transpose2d(x, w, b, g.stride, g.padding, g.output_padding)
    return F.conv2d(x, w, b, g.stride, g.padding)


def _weight_grad(gy: Tensor, x: Tensor, w: Tensor, g: Geometry) -> Tensor:
    """dL/dw of conv(x, w) (geometry g) for incoming gradient gy; w gives only shape and layout."""
    if g.kernel == "triton":
        wgrad = conv_wgrad_op if torch.compiler.is_compiling() else _wgrad_kernel
        # a transposed conv's weight gradient is the direct one with the roles of x and gy swapped
        return wgrad(x, gy, w, g.stride, g.padding) if g.transposed else wgrad(gy, x, w, g.stride, g.padding)
    # cudnn's weight-gradient kernels want the gradient in the layout of the input
    gy = gy.contiguous(memory_format=memory_format_of(x))
    return torch.ops.aten.convolution_backward(
        gy, x, w, None, [g.stride] * 2, [g.padding] * 2, [1, 1], g.transposed, list(g.output_padding), 1,
        [False, True, False],
    )[1]


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, g: Geometry) -> Tensor:
        ctx.g, ctx.has_bias = g, b is not None
        ctx.nodes = gradient_nodes(x, w, b)
        ctx.save_for_backward(x, w)
        return _apply(x, w, b, g)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = (needed(ctx, i) for i in range(3))
        gx = gw = gb = None
        if need_x:
            gx = conv(gy, w, None, ctx.g.adjoint(x.shape[-2:], gy.shape[-2:], w.shape[-1]))
        if need_w:
            # torch.compile traces no autograd nodes (gradient_nodes is None there) and cannot read
            # the grad_fn that trackable inspects: the views are only for the eager engine
            eager = not torch.compiler.is_compiling()
            gw = _WeightGrad.apply(trackable(gy) if eager else gy, trackable(x) if eager else x, w.detach(), ctx.g)
        if need_b:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None


class _WeightGrad(torch.autograd.Function):
    """dL/dw of conv(x, w) for incoming gradient gy; `w` gives only the shape and dtype."""

    @staticmethod
    def forward(ctx: Any, gy: Tensor, x: Tensor, w: Tensor, g: Geometry) -> Tensor:
        ctx.g = g
        ctx.nodes = gradient_nodes(gy, x)
        ctx.save_for_backward(gy, x)
        return _weight_grad(gy, x, w, g)

    @staticmethod
    def backward(ctx: Any, ggw: Tensor) -> tuple[Tensor | None, ...]:
        gy, x = ctx.saved_tensors
        need_gy, need_x = (needed(ctx, i) for i in range(2))
        d_gy = conv(x, ggw, None, ctx.g) if need_gy else None
        d_x = conv(gy, ggw, None, ctx.g.adjoint(x.shape[-2:], gy.shape[-2:], ggw.shape[-1])) if need_x else None
        return d_gy, d_x, None, None


def conv(x: Tensor, w: Tensor, b: Tensor | None, g: Geometry) -> Tensor:
    """One convolution of geometry `g` through the zero-free chain (inputs already in one dtype)."""
    needs_grad = x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
    if not (needs_grad and torch.is_grad_enabled()):
        return _apply(x, w, b, g)
    return _Conv.apply(trackable(x), trackable(w), trackable(b), g)


def _check(x: Tensor, w: Tensor, transposed: bool, kernel: str) -> None:
    if kernel not in CONV_KERNELS:
        raise ValueError(f"conv kernel must be one of {CONV_KERNELS}, got {kernel!r}")
    if kernel == "triton":
        resolve("triton", x.device)  # a clear error where Triton cannot run (CPU without the interpreter)
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"expected a 4-d input and weight, got {x.dim()}-d and {w.dim()}-d")
    if w.shape[-1] != w.shape[-2]:
        raise ValueError(f"expected a square kernel, got {tuple(w.shape[-2:])}")
    channels = w.shape[0] if transposed else w.shape[1]
    if x.shape[1] != channels:
        raise ValueError(f"input has {x.shape[1]} channels, the weight {tuple(w.shape)} expects {channels}")


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0, *,
           kernel: str = "cudnn") -> Tensor:
    """F.conv2d (square kernel, one group, no dilation) whose derivatives of every order run no
    convolution on a zero path. Inputs must share one dtype (the layers cast them first).
    kernel: "cudnn" (PyTorch's) or "triton" (ehm_fast.kernels.conv), in every direction."""
    _check(x, weight, False, kernel)
    return conv(x, weight, bias, Geometry(stride, padding, kernel=kernel))


def conv_transpose2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0,
                     output_padding: int = 0, *, kernel: str = "cudnn") -> Tensor:
    """F.conv_transpose2d (weight [C_in, C_out, k, k]) with the zero-free derivatives of `conv2d`."""
    _check(x, weight, True, kernel)
    return conv(x, weight, bias, Geometry(stride, padding, True, (output_padding, output_padding), kernel))
