"""Triton kernels of the fused batch norm + activation (the op is ehm_fast.nn.batch_norm).

x [N, C, H, W] is read as a matrix of R = N*H*W rows by C channels. Channels_last memory is that
matrix row-major, which is the GPU layout; contiguous NCHW is the same matrix through (n, hw)
index math (CHANNELS_LAST picks it). Every kernel works on [BLOCK_R, BLOCK_C] tiles and computes
in the accumulation dtype of the statistics it is given: fp32, fp64 for fp64 inputs.

- statistics: each program reduces a chunk of rows of one channel block, merging its tiles'
  (mean, M2) with Chan's formula; a second kernel merges the chunks' partials the same way. No
  sum of squares (it cancels catastrophically in fp32), no atomics (the result is deterministic).
- forward: y = act((x + input_bias - mean) * rstd * weight + bias) in one pass.
- backward: with gz = gy * act'(pre-activation), recomputed from x, one reduction pass gives
  per-channel partials of sum(gz), sum(gz * xhat) and sum(xhat), then one elementwise pass
  gx = rstd * weight * (gz - a - xhat * b) with per-channel a, b from the caller (zero when
  the statistics were running ones, which do not depend on x).

ACT is the activation's index in ehm_fast.nn.batch_norm.ACTIVATIONS: 0 linear, 1 relu, 2 lrelu.
SLOPE is a constexpr so fp64 kernels use the exact fp64 slope (a float argument arrives as fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ehm_fast.ops.contract import acc_dtype

TILE = 4096  # elements per [BLOCK_R, BLOCK_C] tile
NUM_WARPS = 8  # 16 elements per thread: the backward's fp32 temporaries (fp64 in tests) stay in registers
MAX_BLOCK_C = 64  # 128 B of bf16 channels per row segment: coalesced channels_last loads
TARGET_PROGRAMS = 1024  # reduction programs per launch: several per SM on an H100/H200


@triton.jit
def _tile(r0, cols, cmask, R, C, HW, CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr):
    """Element offsets and mask of rows [r0, r0 + BLOCK_R) x cols; int64 offsets only for WIDE
    tensors (2**31 elements or more): they cost a register pair per element."""
    rows = r0 + tl.arange(0, BLOCK_R)
    mask = (rows < R)[:, None] & cmask[None, :]
    if WIDE:
        rows = rows.to(tl.int64)
    if CHANNELS_LAST:
        offs = rows[:, None] * C + cols[None, :]
    else:
        n = rows // HW
        offs = (n * C * HW + (rows - n * HW))[:, None] + cols[None, :] * HW
    return offs, mask


@triton.jit
def _chan_merge(mean, m2, n, mean_b, m2_b, n_b):
    """(mean, M2) of n values merged with those of n_b more (Chan et al.); n = 0 takes block b."""
    total = n + n_b
    delta = mean_b - mean
    return mean + delta * (n_b / total), m2 + m2_b + delta * delta * (n * n_b / total)


@triton.jit
def _channel_params(MEAN, RSTD, W, B, IB, cols, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    HAS_IB: tl.constexpr):
    """Per-channel (centre, rstd, weight, bias): xhat = (x - centre) * rstd, centre = mean - input_bias."""
    centre = tl.load(MEAN + cols, mask=cmask, other=0.0)
    rstd = tl.load(RSTD + cols, mask=cmask, other=0.0)
    if HAS_IB:
        centre -= tl.load(IB + cols, mask=cmask, other=0.0).to(rstd.dtype)
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(rstd.dtype)
    else:
        w = tl.full(rstd.shape, 1.0, rstd.dtype)
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(rstd.dtype)
    else:
        b = tl.zeros(rstd.shape, rstd.dtype)
    return centre, rstd, w, b


@triton.jit
def _normalize(x, centre, rstd, w, b):
    """(xhat, pre-activation); forward and backward share it so act' sees the forward's signs."""
    xhat = (x - centre[None, :]) * rstd[None, :]
    return xhat, xhat * w[None, :] + b[None, :]


@triton.jit
def _act(v, SLOPE: tl.constexpr, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.where(v < 0, 0.0, v)  # not maximum: NaN stays NaN, as in torch.relu
    elif ACT == 2:
        v = tl.where(v < 0, v * SLOPE, v)
    return v


@triton.jit
def _act_grad(g, pre, SLOPE: tl.constexpr, ACT: tl.constexpr):
    """g * act'(pre), with act'(0) as torch's relu / leaky_relu backward take it."""
    if ACT == 1:
        g = tl.where(pre > 0, g, 0.0)
    elif ACT == 2:
        g = tl.where(pre > 0, g, g * SLOPE)
    return g


@triton.jit
def _bn_stats_kernel(X, MEAN_P, M2_P, R, C, HW, rows_per_prog, CHANNELS_LAST: tl.constexpr,
                     WIDE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial (mean, M2) [P, C] of each chunk of rows_per_prog rows (a multiple of BLOCK_R)."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc = MEAN_P.dtype.element_ty
    begin = pid * rows_per_prog
    mean = tl.zeros([BLOCK_C], acc)
    m2 = tl.zeros([BLOCK_C], acc)
    for r0 in range(begin, tl.minimum(begin + rows_per_prog, R), BLOCK_R):
        offs, mask = _tile(r0, cols, cmask, R, C, HW, CHANNELS_LAST, WIDE, BLOCK_R)
        x = tl.load(X + offs, mask=mask, other=0.0).to(acc)
        n_b = tl.minimum(R - r0, BLOCK_R).to(acc)
        mean_b = tl.sum(x, axis=0) / n_b
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        mean, m2 = _chan_merge(mean, m2, (r0 - begin).to(acc), mean_b, tl.sum(d * d, axis=0), n_b)
    tl.store(MEAN_P + pid * C + cols, mean, mask=cmask)
    tl.store(M2_P + pid * C + cols, m2, mask=cmask)


@triton.jit
def _bn_stats_combine_kernel(MEAN_P, M2_P, MEAN, M2, P, R, C, rows_per_prog, BLOCK_P: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """(mean, M2) [C] from the P chunk partials, BLOCK_P chunks at a time, in chunk order."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc = MEAN.dtype.element_ty
    mean = tl.zeros([BLOCK_C], acc)
    m2 = tl.zeros([BLOCK_C], acc)
    for p0 in range(0, P, BLOCK_P):
        chunks = p0 + tl.arange(0, BLOCK_P)
        pmask = chunks < P
        counts = tl.where(pmask, tl.minimum(R - chunks * rows_per_prog, rows_per_prog), 0).to(acc)
        mask = pmask[:, None] & cmask[None, :]
        offs = chunks[:, None] * C + cols[None, :]
        mean_p = tl.load(MEAN_P + offs, mask=mask, other=0.0)
        n_b = tl.sum(counts, axis=0)
        mean_b = tl.sum(counts[:, None] * mean_p, axis=0) / n_b
        d = tl.where(mask, mean_p - mean_b[None, :], 0.0)
        m2_b = tl.sum(tl.load(M2_P + offs, mask=mask, other=0.0), axis=0) + tl.sum(counts[:, None] * d * d, axis=0)
        mean, m2 = _chan_merge(mean, m2, tl.minimum(p0 * rows_per_prog, R).to(acc), mean_b, m2_b, n_b)
    tl.store(MEAN + cols, mean, mask=cmask)
    tl.store(M2 + cols, m2, mask=cmask)


@triton.jit
def _bn_act_fwd_kernel(X, Y, MEAN, RSTD, W, B, IB, R, C, HW, SLOPE: tl.constexpr, ACT: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IB: tl.constexpr,
                       CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    centre, rstd, w, b = _channel_params(MEAN, RSTD, W, B, IB, cols, cmask, HAS_W, HAS_B, HAS_IB)
    offs, mask = _tile(tl.program_id(0) * BLOCK_R, cols, cmask, R, C, HW, CHANNELS_LAST, WIDE, BLOCK_R)
    x = tl.load(X + offs, mask=mask, other=0.0).to(rstd.dtype)
    _, pre = _normalize(x, centre, rstd, w, b)
    tl.store(Y + offs, _act(pre, SLOPE, ACT).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_bwd_sums_kernel(GY, X, MEAN, RSTD, W, B, IB, PART, R, C, HW, rows_per_prog, SLOPE: tl.constexpr,
                            ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IB: tl.constexpr,
                            CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    """Partials [3, P, C] of sum(gz), sum(gz * xhat), sum(xhat) over each chunk of rows."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    centre, rstd, w, b = _channel_params(MEAN, RSTD, W, B, IB, cols, cmask, HAS_W, HAS_B, HAS_IB)
    s_gz = tl.zeros([BLOCK_C], rstd.dtype)
    s_gzx = tl.zeros([BLOCK_C], rstd.dtype)
    s_x = tl.zeros([BLOCK_C], rstd.dtype)
    begin = pid * rows_per_prog
    for r0 in range(begin, tl.minimum(begin + rows_per_prog, R), BLOCK_R):
        offs, mask = _tile(r0, cols, cmask, R, C, HW, CHANNELS_LAST, WIDE, BLOCK_R)
        x = tl.load(X + offs, mask=mask, other=0.0).to(rstd.dtype)
        gy = tl.load(GY + offs, mask=mask, other=0.0).to(rstd.dtype)
        xhat, pre = _normalize(x, centre, rstd, w, b)
        xhat = tl.where(mask, xhat, 0.0)
        gz = _act_grad(gy, pre, SLOPE, ACT)
        s_gz += tl.sum(gz, axis=0)
        s_gzx += tl.sum(gz * xhat, axis=0)
        s_x += tl.sum(xhat, axis=0)
    plane = tl.num_programs(0) * C
    tl.store(PART + pid * C + cols, s_gz, mask=cmask)
    tl.store(PART + plane + pid * C + cols, s_gzx, mask=cmask)
    tl.store(PART + 2 * plane + pid * C + cols, s_x, mask=cmask)


@triton.jit
def _bn_act_bwd_dx_kernel(GY, X, MEAN, RSTD, W, B, IB, COEF, GX, R, C, HW, SLOPE: tl.constexpr, ACT: tl.constexpr,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_IB: tl.constexpr, BATCH_STATS: tl.constexpr,
                          CHANNELS_LAST: tl.constexpr, WIDE: tl.constexpr, BLOCK_R: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    centre, rstd, w, b = _channel_params(MEAN, RSTD, W, B, IB, cols, cmask, HAS_W, HAS_B, HAS_IB)
    offs, mask = _tile(tl.program_id(0) * BLOCK_R, cols, cmask, R, C, HW, CHANNELS_LAST, WIDE, BLOCK_R)
    x = tl.load(X + offs, mask=mask, other=0.0).to(rstd.dtype)
    gy = tl.load(GY + offs, mask=mask, other=0.0).to(rstd.dtype)
    xhat, pre = _normalize(x, centre, rstd, w, b)
    gz = _act_grad(gy, pre, SLOPE, ACT)
    if BATCH_STATS:  # mean and rstd are functions of this batch: their terms of the gradient
        mean_gz = tl.load(COEF + cols, mask=cmask, other=0.0)
        mean_gzx = tl.load(COEF + C + cols, mask=cmask, other=0.0)
        gz = gz - mean_gz[None, :] - xhat * mean_gzx[None, :]
    tl.store(GX + offs, (gz * (rstd * w)[None, :]).to(GX.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class _Geometry:
    """x as the [rows, C] matrix the kernels see, and their tiling of it."""

    rows: int
    c: int
    hw: int
    channels_last: bool
    wide: bool
    block_r: int
    block_c: int

    @property
    def meta(self) -> dict:
        return dict(CHANNELS_LAST=self.channels_last, WIDE=self.wide, BLOCK_R=self.block_r, BLOCK_C=self.block_c,
                    num_warps=NUM_WARPS)

    @property
    def c_blocks(self) -> int:
        return triton.cdiv(self.c, self.block_c)

    def tiles(self) -> tuple[int, int]:
        """The grid of the elementwise kernels: one program per tile."""
        return triton.cdiv(self.rows, self.block_r), self.c_blocks

    def chunks(self) -> tuple[int, int]:
        """(rows per reduction program, a multiple of block_r; number of chunks P)."""
        want = max(1, min(triton.cdiv(TARGET_PROGRAMS, self.c_blocks), triton.cdiv(self.rows, self.block_r)))
        per = triton.cdiv(triton.cdiv(self.rows, want), self.block_r) * self.block_r
        return per, triton.cdiv(self.rows, per)


def _geometry(x: torch.Tensor) -> _Geometry:
    """NCHW when x is both contiguous and channels_last: then the two are the same memory."""
    n, c, h, w = x.shape
    if x.is_contiguous():
        channels_last = False
    elif x.is_contiguous(memory_format=torch.channels_last):
        channels_last = True
    else:
        raise ValueError("batch norm kernels take contiguous or channels_last tensors")
    block_c = min(triton.next_power_of_2(c), MAX_BLOCK_C)
    return _Geometry(n * h * w, c, h * w, channels_last, x.numel() >= 2**31, max(1, TILE // block_c), block_c)


def _same_layout(t: torch.Tensor, g: _Geometry) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if g.channels_last else torch.contiguous_format)


def _operands(rstd: torch.Tensor, weight, bias, input_bias) -> tuple[list[torch.Tensor], dict]:
    """The optional per-channel operands and their HAS_ flags; an absent one is passed as rstd,
    which its flag keeps the kernel from reading."""
    present = [weight, bias, input_bias]
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_IB=input_bias is not None)
    return [rstd if t is None else t for t in present], flags


def bn_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, M2 = sum of squared deviations) of x, in the accumulation dtype."""
    g = _geometry(x)
    per, chunks = g.chunks()
    acc = acc_dtype(x.dtype)
    mean_p, m2_p = x.new_empty(chunks, g.c, dtype=acc), x.new_empty(chunks, g.c, dtype=acc)
    _bn_stats_kernel[(chunks, g.c_blocks)](x, mean_p, m2_p, g.rows, g.c, g.hw, per, **g.meta)
    mean, m2 = x.new_empty(g.c, dtype=acc), x.new_empty(g.c, dtype=acc)
    block_p = max(1, min(triton.next_power_of_2(chunks), TILE // g.block_c))
    _bn_stats_combine_kernel[(g.c_blocks,)](mean_p, m2_p, mean, m2, chunks, g.rows, g.c, per, BLOCK_P=block_p,
                                            BLOCK_C=g.block_c, num_warps=NUM_WARPS)
    return mean, m2


def bn_act_fwd(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None,
               bias: torch.Tensor | None, input_bias: torch.Tensor | None, act: int, slope: float) -> torch.Tensor:
    """act((x + input_bias - mean) * rstd * weight + bias) in x's dtype and memory format."""
    g = _geometry(x)
    y = torch.empty_like(x)
    params, flags = _operands(rstd, weight, bias, input_bias)
    _bn_act_fwd_kernel[g.tiles()](x, y, mean, rstd, *params, g.rows, g.c, g.hw, SLOPE=slope, ACT=act, **flags,
                                  **g.meta)
    return y


def bn_act_bwd_sums(gy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, input_bias: torch.Tensor | None,
                    act: int, slope: float) -> torch.Tensor:
    """[3, C]: sum(gz), sum(gz * xhat), sum(xhat) over this tensor's rows, in rstd's dtype."""
    g = _geometry(x)
    per, chunks = g.chunks()
    part = x.new_empty(3, chunks, g.c, dtype=rstd.dtype)
    params, flags = _operands(rstd, weight, bias, input_bias)
    _bn_act_bwd_sums_kernel[(chunks, g.c_blocks)](_same_layout(gy, g), x, mean, rstd, *params, part, g.rows, g.c,
                                                  g.hw, per, SLOPE=slope, ACT=act, **flags, **g.meta)
    return part.sum(dim=1)  # a fixed-order reduction: deterministic


def bn_act_bwd_dx(gy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                  weight: torch.Tensor | None, bias: torch.Tensor | None, input_bias: torch.Tensor | None,
                  coef: torch.Tensor | None, act: int, slope: float) -> torch.Tensor:
    """The input gradient; coef [2, C] holds the batch means of gz and gz * xhat over the whole
    batch, None when mean and rstd were running statistics."""
    g = _geometry(x)
    gx = torch.empty_like(x)
    params, flags = _operands(rstd, weight, bias, input_bias)
    _bn_act_bwd_dx_kernel[g.tiles()](_same_layout(gy, g), x, mean, rstd, *params, rstd if coef is None else coef, gx,
                                     g.rows, g.c, g.hw, SLOPE=slope, ACT=act, **flags, BATCH_STATS=coef is not None,
                                     **g.meta)
    return gx
