"""Triton kernels of the fused bias + activation (the op is ehm_fast.nn.bias_act).

Both kernels are elementwise over the flat storage of a dense tensor x of shape [N, C, ...],
contiguous or channels-last. Element i belongs to channel (i // inner) % C, where `inner` is the
number of elements of one channel's run in memory: H*W for contiguous NCHW, 1 for channels-last
and 2-D x (triton specialises an int argument equal to 1 into a constant, so the division then
compiles away).

- forward: y = act(x + bias[channel]), the bias rounded to x's dtype first (what autocast does).
- backward: gx = gy * act'(y), from the forward's output alone: relu and lrelu take the mask
  from y's sign (the same as x's, since slope > 0), tanh takes 1 - y^2.

ACT is the activation's name (a constexpr string: one compiled kernel per activation). Arithmetic
is in ACC, fp32 (fp64 for fp64 tensors); results are stored in the tensor's dtype. The slope is
an fp64 argument, so fp64 kernels use the exact slope (a plain float argument arrives as fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dtypes import tl_acc

BLOCK = 1024  # 8 elements per thread at 4 warps: one 16-byte load of bf16


@triton.jit
def _block(n, BLOCK: tl.constexpr):
    """(start, lanes, mask) of this program's block. Only the scalar start is int64: per-lane
    index math stays int32 however large the tensor."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    lanes = tl.arange(0, BLOCK)
    return start, lanes, lanes < tl.minimum(n - start, BLOCK).to(tl.int32)


@triton.jit
def _channel(start, lanes, C, inner):
    """(start + lanes) // inner % C, with the int64 part done once per program."""
    first = ((start // inner) % C).to(tl.int32)
    offset = (start % inner).to(tl.int32)
    return (first + (offset + lanes) // inner) % C


@triton.jit
def _tanh(v):
    """sign(v) (1 - e) / (1 + e), e = exp(-2|v|): no overflow for any v; the absolute error is
    about one ulp of 1 (libdevice's tanh does not run in the interpreter)."""
    e = tl.exp(-2.0 * tl.abs(v))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(v < 0, -t, t)


@triton.jit
def _act(v, slope, ACT: tl.constexpr):
    # the comparisons keep NaN as torch does: relu(NaN) = lrelu(NaN) = NaN
    if ACT == "relu":
        v = tl.where(v < 0, 0.0, v)
    elif ACT == "lrelu":
        v = tl.where(v > 0, v, v * slope)
    elif ACT == "tanh":
        v = _tanh(v)
    return v


@triton.jit
def _act_grad(g, y, slope, ACT: tl.constexpr):
    # relu and lrelu as torch's threshold_backward and leaky_relu_backward decide at 0 and NaN
    if ACT == "relu":
        g = tl.where(y <= 0, 0.0, g)
    elif ACT == "lrelu":
        g = tl.where(y > 0, g, g * slope)
    elif ACT == "tanh":
        g = g * (1.0 - y * y)
    return g


@triton.jit
def _bias_act_fwd_kernel(X, B, Y, n, C, inner, slope: tl.float64, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                         ACC: tl.constexpr, BLOCK: tl.constexpr):
    start, lanes, mask = _block(n, BLOCK)
    v = tl.load(X + start + lanes, mask=mask).to(ACC)
    if HAS_BIAS:
        b = tl.load(B + _channel(start, lanes, C, inner), mask=mask)
        v += b.to(Y.dtype.element_ty).to(ACC)
    v = _act(v, tl.full([BLOCK], slope, ACC), ACT)
    tl.store(Y + start + lanes, v.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(GY, Y, GX, n, slope: tl.float64, ACT: tl.constexpr, ACC: tl.constexpr,
                         BLOCK: tl.constexpr):
    start, lanes, mask = _block(n, BLOCK)
    g = tl.load(GY + start + lanes, mask=mask).to(ACC)
    y = tl.load(Y + start + lanes, mask=mask).to(ACC)
    g = _act_grad(g, y, tl.full([BLOCK], slope, ACC), ACT)
    tl.store(GX + start + lanes, g.to(GX.dtype.element_ty), mask=mask)


def _inner(x: torch.Tensor) -> int:
    """Elements of one channel's run in x's memory: x[0, 0].numel() if contiguous, else 1
    (channels-last, the only other layout the op hands over)."""
    if x.dim() == 2 or not x.is_contiguous():
        return 1
    return x[0, 0].numel()


def bias_act_fwd(x: torch.Tensor, bias: torch.Tensor | None, activation: str, slope: float) -> torch.Tensor:
    """act(x + bias[channel]) for x dense in contiguous or channels-last order; bias [C] or None."""
    y = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return y
    _bias_act_fwd_kernel[(triton.cdiv(n, BLOCK),)](
        x, x if bias is None else bias, y, n, x.shape[1], _inner(x), slope,
        HAS_BIAS=bias is not None, ACT=activation, ACC=tl_acc(x.dtype), BLOCK=BLOCK,
    )
    return y


def bias_act_bwd(gy: torch.Tensor, y: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    """gy * act'(y) for gy and y dense in the same memory order."""
    gx = torch.empty_like(y)
    n = y.numel()
    if n == 0:
        return gx
    _bias_act_bwd_kernel[(triton.cdiv(n, BLOCK),)](
        gy, y, gx, n, slope, ACT=activation, ACC=tl_acc(y.dtype), BLOCK=BLOCK,
    )
    return gx
