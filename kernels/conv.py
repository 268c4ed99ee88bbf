"""Triton kernels of the convolution (implicit GEMM), its input gradient and its weight gradient.

Tensors are [N, C, H, W] with any strides (the kernels take all of them; channels_last, where the
channel stride is 1 and triton specialises it to a constant, is the fast layout: every load is a
contiguous channel slice); weights are [O, C, k, k], any strides. Square kernel k, one stride and
one padding on both axes, no groups or dilation. Products accumulate in fp32 (fp64 for fp64
tensors, whose dots run in "ieee" precision like fp32's: no tf32). docs/conv_kernels.md has the
design; in short:

- `conv_fwd`: y = conv2d(x, w). GEMM of M = N*OH*OW output pixels by N = O channels over
  K = k*k*C, walked as one flat loop over (tap, channel block) so the pipeliner sees one loop.
- `conv_dgrad`: dx = conv_transpose2d(dy, w) to a given output size: the input gradient of a
  conv and the forward of a transposed conv. Split into stride^2 phases (the output's row and
  column parities): in each, only the taps kh = ph + stride*t reach a pixel, so it is a stride-1
  GEMM over ceil(k/stride)^2 taps with no multiplication by inserted zeros.
- `conv_wgrad`: dw[o, c, kh, kw] = sum over (n, oh, ow) of dy * x, the GEMM of M = O by
  N = k*k*C over K = N*OH*OW, that reduction split over `split` programs (split-K) whose fp32
  partials are summed in a fixed order (deterministic, no atomics).

Epilogues of conv_fwd and conv_dgrad: + bias[channel], an activation (ACTIVATIONS), and the
batch-norm statistics of the result (its fp32 values before rounding): per-channel partial sum
and centred sum of squares of each tile, merged by Chan's formula into (mean, M2), the contract
of kernels.batch_norm.bn_stats (no raw sum of squares, which cancels in fp32).

Tiles (`Tile`) are chosen per shape by timing each candidate once (`_tuned`, cached per process);
the interpreter and the non-16-bit dtypes (tests) use one tile each. A tile can also be passed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ehm_fast.ops.contract import acc_dtype, memory_format_of

ACTIVATIONS = ("linear", "relu", "lrelu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import, so fixed here too
SPLIT_TARGET_WAVES = 2  # split-K until the weight gradient's programs fill the SMs about twice
MIN_SPLIT_ROWS = 4  # each split reduces at least this many BLOCK_K row blocks


@dataclass(frozen=True)
class Tile:
    """BLOCK_M x BLOCK_N output tile, BLOCK_K reduction step, warps and pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# bf16/fp16 candidates on sm_90 (BLOCK_K 64 = one 128-byte bf16 channel slice per row)
GPU_TILES = (Tile(128, 128, 64, 8, 3), Tile(128, 64, 64, 4, 4), Tile(64, 128, 64, 4, 4), Tile(128, 256, 64, 8, 3))
WIDE_TILE = Tile(64, 64, 32, 8, 2)  # fp32 / fp64 (tests): fits shared memory at 4 and 8 bytes
INTERPRETER_TILE = Tile(32, 32, 16, 1, 1)  # tl.dot's smallest sizes; few programs for the interpreter


# ---------------------------------------------------------------- shared pieces of the kernels


@triton.jit
def _act(v, SLOPE: tl.constexpr, ACT: tl.constexpr):
    # comparisons, not maximum: NaN stays NaN as in torch
    if ACT == "relu":
        v = tl.where(v < 0, 0.0, v)
    elif ACT == "lrelu":
        v = tl.where(v < 0, v * SLOPE, v)
    return v


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + a @ b. The interpreter (triton 3.8) multiplies bf16 as its raw uint16 bits: there
    16-bit tiles go to fp32 first (exact products, as the tensor cores form them)."""
    if INTERPRETER and a.dtype.primitive_bitwidth == 16:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _rounded(v, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """v in `dtype`, rounded to nearest even. The interpreter's fp32 -> bf16 cast does not round
    to nearest (up to one ulp off): there the rounding is done on the bits."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def _epilogue(acc, pix_ptr, rmask, cols, cmask, B, PSUM, PM2, PCNT, tile_id, n_cols, s_c,
              HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr, STATS: tl.constexpr,
              INTERPRETER: tl.constexpr):
    """+ bias, activation, the tile's statistics partials, and the store of the [pixels, channels]
    tile (pix_ptr: each row's pixel address)."""
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=cmask, other=0.0).to(acc.dtype)[None, :]
    acc = _act(acc, SLOPE, ACT)
    mask = rmask[:, None] & cmask[None, :]
    if STATS:
        count = tl.sum(rmask.to(acc.dtype), axis=0)
        total = tl.sum(tl.where(mask, acc, 0.0), axis=0)
        dev = tl.where(mask, acc - (total / tl.maximum(count, 1.0))[None, :], 0.0)
        tl.store(PSUM + tile_id * n_cols + cols, total, mask=cmask)
        tl.store(PM2 + tile_id * n_cols + cols, tl.sum(dev * dev, axis=0), mask=cmask)
        tl.store(PCNT + tile_id, count)  # every channel block writes the same count
    tl.store(pix_ptr[:, None] + cols[None, :] * s_c, _rounded(acc, pix_ptr.dtype.element_ty, INTERPRETER), mask=mask)


# ---------------------------------------------------------------- forward: implicit GEMM


@triton.jit
def _conv_fwd_kernel(X, Wt, B, Y, PSUM, PM2, PCNT,
                     H, W, C, OH, OW, O, M,
                     sxn, sxc, sxh, sxw, swo, swc, swh, sww, syn, syc, syh, syw,
                     STRIDE: tl.constexpr, PAD: tl.constexpr, KSIZE: tl.constexpr,
                     HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr, STATS: tl.constexpr,
                     ACC: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(O, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n  # the channel tiles of one pixel block run together: x read once
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n = rows // (OH * OW)
    oh = (rows % (OH * OW)) // OW
    ow = rows % OW
    x_img = X + n.to(tl.int64) * sxn
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < O
    ks = tl.arange(0, BLOCK_K)
    c_blocks = tl.cdiv(C, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for it in range(KSIZE * KSIZE * c_blocks):  # (tap, channel block) as one loop
        tap = it // c_blocks
        kh, kw = tap // KSIZE, tap % KSIZE
        c = (it % c_blocks) * BLOCK_K + ks
        ih = oh * STRIDE - PAD + kh
        iw = ow * STRIDE - PAD + kw
        valid = rmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load((x_img + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                    mask=valid[:, None] & (c < C)[None, :], other=0.0)
        b = tl.load(Wt + kh * swh + kw * sww + c[:, None] * swc + cols[None, :] * swo,
                    mask=(c < C)[:, None] & cmask[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, INTERPRETER)
    pix = Y + n.to(tl.int64) * syn + oh * syh + ow * syw
    _epilogue(acc, pix, rmask, cols, cmask, B, PSUM, PM2, PCNT, pid_m, O, syc, HAS_BIAS, ACT, SLOPE, STATS,
              INTERPRETER)


# ---------------------------------------------------------------- input gradient: stride^2 phase GEMMs


@triton.jit
def _conv_dgrad_kernel(DY, Wt, B, DX, PSUM, PM2, PCNT,
                       OH, OW, O, H, W, C, N, tiles_per_phase,
                       sdn, sdc, sdh, sdw, swo, swc, swh, sww, sxn, sxc, sxh, sxw,
                       STRIDE: tl.constexpr, PAD: tl.constexpr, KSIZE: tl.constexpr,
                       HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr, STATS: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx [N, C, H, W] from dy [N, O, OH, OW]: program axis 1 is the phase (ph, pw), the residues
    of (ih + PAD, iw + PAD) mod STRIDE; its pixels ih = ih0 + STRIDE*qh take the taps kh = ph +
    STRIDE*th from dy rows oh = qh + base_h - th."""
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    ph, pw = phase // STRIDE, phase % STRIDE
    ih0 = (ph + STRIDE * PAD - PAD) % STRIDE  # the first dx row of the phase
    iw0 = (pw + STRIDE * PAD - PAD) % STRIDE
    base_h = (ih0 + PAD - ph) // STRIDE
    base_w = (iw0 + PAD - pw) // STRIDE
    qh_n = (H - ih0 + STRIDE - 1) // STRIDE
    qw_n = (W - iw0 + STRIDE - 1) // STRIDE
    taps_h = (KSIZE - ph + STRIDE - 1) // STRIDE
    taps_w = (KSIZE - pw + STRIDE - 1) // STRIDE
    num_n = tl.cdiv(C, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N * qh_n * qw_n
    n = rows // (qh_n * qw_n)
    qh = (rows % (qh_n * qw_n)) // qw_n
    qw = rows % qw_n
    dy_img = DY + n.to(tl.int64) * sdn
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < C
    ks = tl.arange(0, BLOCK_K)
    o_blocks = tl.cdiv(O, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for it in range(taps_h * taps_w * o_blocks):
        tap = it // o_blocks
        th, tw = tap // taps_w, tap % taps_w
        o = (it % o_blocks) * BLOCK_K + ks
        oh = qh + base_h - th
        ow = qw + base_w - tw
        valid = rmask & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        a = tl.load((dy_img + oh * sdh + ow * sdw)[:, None] + o[None, :] * sdc,
                    mask=valid[:, None] & (o < O)[None, :], other=0.0)
        b = tl.load(Wt + (ph + STRIDE * th) * swh + (pw + STRIDE * tw) * sww + o[:, None] * swo + cols[None, :] * swc,
                    mask=(o < O)[:, None] & cmask[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, INTERPRETER)
    pix = DX + n.to(tl.int64) * sxn + (ih0 + STRIDE * qh) * sxh + (iw0 + STRIDE * qw) * sxw
    _epilogue(acc, pix, rmask, cols, cmask, B, PSUM, PM2, PCNT, phase * tiles_per_phase + pid_m, C, sxc,
              HAS_BIAS, ACT, SLOPE, STATS, INTERPRETER)


# ---------------------------------------------------------------- weight gradient: split-K GEMM


@triton.jit
def _conv_wgrad_kernel(X, DY, DW, H, W, C, OH, OW, O, R, rows_per_split,
                       sxn, sxc, sxh, sxw, sdn, sdc, sdh, sdw, s_split, s_o, s_c, s_kh, s_kw,
                       STRIDE: tl.constexpr, PAD: tl.constexpr, KSIZE: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[o, c, kh, kw] (one partial per program_id(1) when split) over rows_per_split of the
    R = N*OH*OW output pixels. A column tile is one tap and a channel block: x loads are
    contiguous channel slices."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    c_blocks = tl.cdiv(C, BLOCK_N)
    num_n = KSIZE * KSIZE * c_blocks
    pid_m, pid_n = pid // num_n, pid % num_n
    tap = pid_n // c_blocks
    kh, kw = tap // KSIZE, tap % KSIZE
    o = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = (pid_n % c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    omask, cmask = o < O, c < C
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, R)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for r0 in range(start, end, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        rmask = r < end
        n = r // (OH * OW)
        oh = (r % (OH * OW)) // OW
        ow = r % OW
        ih = oh * STRIDE - PAD + kh
        iw = ow * STRIDE - PAD + kw
        valid = rmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        n64 = n.to(tl.int64)
        a = tl.load((DY + n64 * sdn + oh * sdh + ow * sdw)[None, :] + o[:, None] * sdc,
                    mask=rmask[None, :] & omask[:, None], other=0.0)
        b = tl.load((X + n64 * sxn + ih * sxh + iw * sxw)[:, None] + c[None, :] * sxc,
                    mask=valid[:, None] & cmask[None, :], other=0.0)
        acc = _dot(a, b, acc, PRECISION, INTERPRETER)
    ptr = DW + split * s_split + kh * s_kh + kw * s_kw + o[:, None] * s_o + c[None, :] * s_c
    tl.store(ptr, _rounded(acc, DW.dtype.element_ty, INTERPRETER), mask=omask[:, None] & cmask[None, :])


# ---------------------------------------------------------------- tile choice


def _dot_args(t: torch.Tensor) -> dict:
    """ACC, PRECISION, INTERPRETER of a kernel on t's dtype: fp32 inputs must not run as tf32,
    fp64 accumulates in fp64; INTERPRETER selects the interpreter's workarounds (_dot, _rounded)."""
    if t.dtype == torch.float64:
        return {"ACC": tl.float64, "PRECISION": "ieee", "INTERPRETER": INTERPRETED}
    wide = t.dtype == torch.float32
    return {"ACC": tl.float32, "PRECISION": "ieee" if wide else "tf32", "INTERPRETER": INTERPRETED}


def _candidates(t: torch.Tensor, stats: bool = False) -> tuple[Tile, ...]:
    if t.device.type != "cuda":
        return (INTERPRETER_TILE,)
    if t.element_size() != 2:
        return (WIDE_TILE,)
    # the widest tile spills registers with the statistics epilogue (sm_90, triton_compile_check)
    return tuple(tile for tile in GPU_TILES if not (stats and tile.block_n >= 256))


_TUNED: dict[tuple, Tile] = {}


def _tuned(key: tuple, like: torch.Tensor, run: Callable[[Tile], object], tile: Tile | None,
           stats: bool = False) -> Tile:
    """`tile`, else the fastest candidate for `key` (timed once per process, then cached). Inside a
    CUDA-graph capture nothing can be timed: an untuned shape takes the first candidate (calls
    before the capture, such as its warm-up, tune it)."""
    if tile is not None:
        return tile
    tiles = _candidates(like, stats)
    if len(tiles) == 1:
        return tiles[0]
    if key not in _TUNED:
        if torch.cuda.is_current_stream_capturing():
            return tiles[0]
        from triton.runtime.errors import OutOfResources
        from triton.testing import do_bench

        times = {}
        for t in tiles:
            try:
                times[t] = do_bench(lambda t=t: run(t), warmup=5, rep=20, return_mode="median")
            except OutOfResources:  # a tile that does not fit this GPU's shared memory
                continue
        _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]


def _key(op: str, *tensors: torch.Tensor, extra: tuple = ()) -> tuple:
    return (op, tensors[0].device.index, tensors[0].dtype, *((tuple(t.shape), t.stride()) for t in tensors), *extra)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---------------------------------------------------------------- wrappers


def _check(x: torch.Tensor, w: torch.Tensor, channels: int, bias: torch.Tensor | None, out_channels: int,
           activation: str) -> None:
    """x's channel dim must be `channels`; bias (if any) has `out_channels` entries."""
    if x.dim() != 4 or w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"expected a 4-d input and a square 4-d kernel, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype or not x.is_floating_point():
        raise ValueError(f"input and weight must share one floating dtype, got {x.dtype} and {w.dtype}")
    if x.shape[1] != channels:
        raise ValueError(f"input has {x.shape[1]} channels, the weight {tuple(w.shape)} expects {channels}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if bias is not None and bias.shape != (out_channels,):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not match {out_channels} output channels")


def _like(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An output in x's memory format (the custom ops' fake implementations say the same)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))


def _stat_buffers(tiles: int, channels: int, like: torch.Tensor, stats: bool) -> tuple[torch.Tensor, ...]:
    acc = acc_dtype(like.dtype)
    if not stats:
        dummy = like.new_empty(0, dtype=acc)
        return dummy, dummy, dummy
    # zeros: dgrad tiles past a smaller phase's end write nothing and must count as empty
    return (like.new_zeros(tiles, channels, dtype=acc), like.new_zeros(tiles, channels, dtype=acc),
            like.new_zeros(tiles, dtype=acc))


def _merge_stats(psum: torch.Tensor, pm2: torch.Tensor, pcnt: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, M2) from per-tile (sum, centred M2, count): Chan's merge, in a fixed order."""
    mean = psum.sum(0) / rows
    tile_mean = psum / pcnt.clamp_min(1)[:, None]
    return mean, pm2.sum(0) + (pcnt[:, None] * (tile_mean - mean) ** 2).sum(0)


Result = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def conv_fwd(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
             activation: str = "linear", slope: float = 0.2, stats: bool = False, tile: Tile | None = None) -> Result:
    """(act(conv2d(x, w, bias, stride, padding)), mean, M2): the output in x's memory format and
    dtype; with `stats` its per-channel mean and M2 (fp32, fp64 for fp64), else None, None."""
    _check(x, w, w.shape[1], bias, w.shape[0], activation)
    n, c, h, wd = x.shape
    o, k = w.shape[0], w.shape[2]
    oh, ow = (h + 2 * padding - k) // stride + 1, (wd + 2 * padding - k) // stride + 1
    y = _like(x, (n, o, oh, ow))
    m = n * oh * ow

    def run(t: Tile) -> tuple[torch.Tensor, ...]:
        m_tiles = triton.cdiv(m, t.block_m)
        bufs = _stat_buffers(m_tiles, o, x, stats)
        if y.numel():
            _conv_fwd_kernel[(m_tiles * triton.cdiv(o, t.block_n),)](
                x, w, x if bias is None else bias, y, *bufs, h, wd, c, oh, ow, o, m,
                *x.stride(), *w.stride(), *y.stride(),
                STRIDE=stride, PAD=padding, KSIZE=k, HAS_BIAS=bias is not None, ACT=activation, SLOPE=slope,
                STATS=stats, **_dot_args(x), BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages)
        return bufs

    bufs = run(_tuned(_key("fwd", x, w, extra=(stride, padding, activation, bias is not None, stats)), x, run, tile,
                      stats))
    return (y, *_merge_stats(*bufs, m)) if stats else (y, None, None)


def conv_dgrad(dy: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
               out_size: tuple[int, int], activation: str = "linear", slope: float = 0.2, stats: bool = False,
               tile: Tile | None = None) -> Result:
    """(act(conv_transpose2d(dy, w, bias, stride, padding) at spatial size `out_size`), mean, M2):
    the input gradient of conv2d(., w) for incoming gradient dy, and the forward of a transposed
    convolution (w [O = dy's channels, C, k, k]). Output in dy's memory format and dtype."""
    _check(dy, w, w.shape[0], bias, w.shape[1], activation)
    n, o, oh, ow = dy.shape
    c, k = w.shape[1], w.shape[2]
    h, wd = out_size
    dx = _like(dy, (n, c, h, wd))
    phases = stride * stride

    def run(t: Tile) -> tuple[torch.Tensor, ...]:
        tiles_per_phase = triton.cdiv(n * triton.cdiv(h, stride) * triton.cdiv(wd, stride), t.block_m)
        bufs = _stat_buffers(phases * tiles_per_phase, c, dy, stats)
        if dx.numel():
            _conv_dgrad_kernel[(tiles_per_phase * triton.cdiv(c, t.block_n), phases)](
                dy, w, dy if bias is None else bias, dx, *bufs, oh, ow, o, h, wd, c, n, tiles_per_phase,
                *dy.stride(), *w.stride(), *dx.stride(),
                STRIDE=stride, PAD=padding, KSIZE=k, HAS_BIAS=bias is not None, ACT=activation, SLOPE=slope,
                STATS=stats, **_dot_args(dy), BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages)
        return bufs

    key = _key("dgrad", dy, w, extra=(stride, padding, h, wd, activation, bias is not None, stats))
    bufs = run(_tuned(key, dy, run, tile, stats))
    return (dx, *_merge_stats(*bufs, n * h * wd)) if stats else (dx, None, None)


def _split_for(t: Tile, o: int, c: int, k: int, rows: int, like: torch.Tensor) -> int:
    """Splits of the reduction that bring the programs to SPLIT_TARGET_WAVES per SM (none on the CPU)."""
    if like.device.type != "cuda":
        return 1
    tiles = triton.cdiv(o, t.block_m) * k * k * triton.cdiv(c, t.block_n)
    wanted = triton.cdiv(SPLIT_TARGET_WAVES * _sm_count(like.device.index or 0), tiles)
    return max(1, min(wanted, rows // (MIN_SPLIT_ROWS * t.block_k)))


def conv_wgrad(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, stride: int, padding: int,
               tile: Tile | None = None, split: int | None = None) -> torch.Tensor:
    """The weight gradient of conv2d(x, w, stride, padding) for incoming gradient dy, in w's shape,
    dtype and memory format (w is read for those only). `split`: programs sharing the reduction
    over the N*OH*OW output pixels (None: enough to fill the GPU)."""
    _check(x, w, w.shape[1], None, 0, "linear")
    n, c, h, wd = x.shape
    o, k = w.shape[0], w.shape[2]
    if dy.dtype != x.dtype or dy.shape[:2] != (n, o):
        raise ValueError(f"gradient {tuple(dy.shape)} {dy.dtype}, input {tuple(x.shape)} {x.dtype} and weight "
                         f"{tuple(w.shape)} do not fit one convolution")
    oh, ow = dy.shape[2:]
    rows = n * oh * ow
    dw = torch.empty_like(w)

    def run(t: Tile) -> torch.Tensor:
        parts = split or _split_for(t, o, c, k, rows, x)
        rows_per_split = triton.cdiv(triton.cdiv(rows, parts), t.block_k) * t.block_k
        parts = triton.cdiv(rows, rows_per_split) if rows else 1
        # one split writes dw itself; several write fp32 partials [split, O, k, k, C] summed below
        out = dw if parts == 1 else torch.empty((parts, o, k, k, c), dtype=torch.promote_types(x.dtype, torch.float32),
                                                device=x.device).permute(0, 1, 4, 2, 3)
        if rows == 0:
            return dw.zero_()
        _conv_wgrad_kernel[(triton.cdiv(o, t.block_m) * k * k * triton.cdiv(c, t.block_n), parts)](
            x, dy, out, h, wd, c, oh, ow, o, rows, rows_per_split, *x.stride(), *dy.stride(),
            out.stride(0) if parts > 1 else 0, *out.stride()[-4:],
            STRIDE=stride, PAD=padding, KSIZE=k, **_dot_args(x), BLOCK_M=t.block_m,
            BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages)
        return dw if parts == 1 else dw.copy_(out.sum(0))

    return run(_tuned(_key("wgrad", dy, x, w, extra=(stride, padding, split)), x, run, tile))
