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
builds the same chain). The kernels are PyTorch's own (cuDNN on a GPU): the same sums, fewer calls.
A backward also skips the directions the running backward will not use (an input gradient taken
with autograd.grad runs no weight-gradient call), which autograd's own convolution node does too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._graph import gradient_nodes, memory_format_of, needed, trackable


@dataclass(frozen=True)
class Geometry:
    """stride and padding (the same along both axes), output_padding (height, width) of a
    transposed convolution."""

    stride: int
    padding: int
    transposed: bool = False
    output_padding: tuple[int, int] = (0, 0)

    def adjoint(self, in_size: torch.Size, out_size: torch.Size, kernel: int) -> "Geometry":
        """The geometry of the input gradient: a direct conv's is the transposed conv that maps the
        output size (H, W) back to `in_size` exactly; a transposed conv's is the direct conv."""
        if self.transposed:
            return Geometry(self.stride, self.padding)
        extra = tuple(i - ((o - 1) * self.stride - 2 * self.padding + kernel) for i, o in zip(in_size, out_size))
        return Geometry(self.stride, self.padding, True, extra)


def _apply(x: Tensor, w: Tensor, b: Tensor | None, g: Geometry) -> Tensor:
    if g.transposed:
        return F.conv_transpose2d(x, w, b, g.stride, g.padding, g.output_padding)
    return F.conv2d(x, w, b, g.stride, g.padding)


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
            gw = _WeightGrad.apply(trackable(gy), trackable(x), w.detach(), ctx.g)
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
        # cudnn's weight-gradient kernels want the gradient in the layout of the input
        gy = gy.contiguous(memory_format=memory_format_of(x))
        return torch.ops.aten.convolution_backward(
            gy, x, w, None, [g.stride] * 2, [g.padding] * 2, [1, 1], g.transposed, list(g.output_padding), 1,
            [False, True, False],
        )[1]

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


def _check(x: Tensor, w: Tensor, transposed: bool) -> None:
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"expected a 4-d input and weight, got {x.dim()}-d and {w.dim()}-d")
    if w.shape[-1] != w.shape[-2]:
        raise ValueError(f"expected a square kernel, got {tuple(w.shape[-2:])}")
    channels = w.shape[0] if transposed else w.shape[1]
    if x.shape[1] != channels:
        raise ValueError(f"input has {x.shape[1]} channels, the weight {tuple(w.shape)} expects {channels}")


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0) -> Tensor:
    """F.conv2d (square kernel, one group, no dilation) whose derivatives of every order run no
    convolution on a zero path. Inputs must share one dtype (the layers cast them first)."""
    _check(x, weight, transposed=False)
    return conv(x, weight, bias, Geometry(stride, padding))


def conv_transpose2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, padding: int = 0,
                     output_padding: int = 0) -> Tensor:
    """F.conv_transpose2d (weight [C_in, C_out, k, k]) with the zero-free derivatives of `conv2d`."""
    _check(x, weight, transposed=True)
    return conv(x, weight, bias, Geometry(stride, padding, True, (output_padding, output_padding)))
