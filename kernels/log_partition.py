"""Triton kernels of the log-partition estimate (same signatures as ehm_fast._C's).

Forward: an online (max, sum) logsumexp over BLOCK-wide vectors per program; a long row is
split over several programs whose partials a second kernel combines. Backward: elementwise,
recomputing w = exp(s - p - lse) from the saved per-row lse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ehm_fast.ops.contract import acc_dtype

MIN_PER_SPLIT = 16384
FWD_BLOCK = 1024
BWD_BLOCK = 1024


def splits_for(rows: int, m: int) -> int:
    """How many programs share one row (the same policy as the CUDA kernels)."""
    if rows >= 512 or m <= MIN_PER_SPLIT:
        return 1
    return min(triton.cdiv(m, MIN_PER_SPLIT), max(1, 1024 // rows))


@triton.jit
def _online_block(S, P, base, begin, end, HAS_P: tl.constexpr, JENSEN: tl.constexpr, F64: tl.constexpr,
                  BLOCK: tl.constexpr):
    """Per-lane running (max, sum) over [begin, end) of one row; for JENSEN a plain sum in `s`."""
    if F64:
        m = tl.full([BLOCK], float("-inf"), tl.float64)
        s = tl.zeros([BLOCK], tl.float64)
    else:
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
    for off in range(begin, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        if JENSEN:
            x = tl.load(S + base + idx, mask=mask, other=0.0).to(s.dtype)
            if HAS_P:
                x -= tl.load(P + base + idx, mask=mask, other=0.0).to(s.dtype)
            s += x
        else:
            x = tl.load(S + base + idx, mask=mask, other=float("-inf")).to(s.dtype)
            if HAS_P:
                x -= tl.load(P + base + idx, mask=mask, other=0.0).to(s.dtype)
            new_m = tl.maximum(m, x)
            scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - new_m))
            term = tl.where(x == float("-inf"), 0.0, tl.exp(x - new_m))
            s = s * scale + term
            m = new_m
    return m, s


@triton.jit
def _merge(m, s, JENSEN: tl.constexpr):
    """Reduce per-lane (max, sum) pairs to one; -inf lanes add nothing, NaN poisons the sum."""
    top = tl.max(m, axis=0)
    if JENSEN:
        total = tl.sum(s, axis=0)
    else:  # no early return: the compiler type-checks the code after one
        total = tl.sum(tl.where(m == float("-inf"), s * 0.0, s * tl.exp(m - top)), axis=0)
    return top, total


@triton.jit
def _finish(OUT, LSE, row, top, total, M, JENSEN: tl.constexpr):
    m_f = tl.zeros_like(total) + M  # not M.to(): M == 1 arrives as a constexpr int
    if JENSEN:
        value = total / m_f
        tl.store(LSE + row, value)
    else:
        lse = top + tl.log(total)
        tl.store(LSE + row, lse)
        value = lse - tl.log(m_f)
    tl.store(OUT + row, value.to(OUT.dtype.element_ty))


@triton.jit
def _lp_fwd_kernel(S, P, OUT, LSE, WS, M, R, per_split, splits, HAS_P: tl.constexpr, JENSEN: tl.constexpr,
                   F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // splits
    split = pid % splits
    begin = split * per_split
    end = tl.minimum(begin + per_split, M)
    m, s = _online_block(S, P, row * M, begin, end, HAS_P, JENSEN, F64, BLOCK)
    top, total = _merge(m, s, JENSEN)
    if splits == 1:
        _finish(OUT, LSE, row, top, total, M, JENSEN)
    else:
        tl.store(WS + pid, top)
        tl.store(WS + R * splits + pid, total)


@triton.jit
def _lp_combine_kernel(WS, OUT, LSE, M, R, splits, JENSEN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    mask = idx < splits
    m = tl.load(WS + row * splits + idx, mask=mask, other=float("-inf"))
    s = tl.load(WS + R * splits + row * splits + idx, mask=mask, other=0.0)
    top, total = _merge(m, s, JENSEN)
    _finish(OUT, LSE, row, top, total, M, JENSEN)


@triton.jit
def _lp_bwd_kernel(GRAD, S, P, LSE, GS, GP, M, blocks_per_row, HAS_P: tl.constexpr, JENSEN: tl.constexpr,
                   NEED_S: tl.constexpr, NEED_P: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // blocks_per_row
    idx = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < M
    offs = row * M + idx
    g = tl.load(GRAD + row)
    if JENSEN:
        d = tl.zeros([BLOCK], g.dtype) + g / M
    else:
        lse = tl.load(LSE + row)
        x = tl.load(S + offs, mask=mask, other=0.0).to(g.dtype)
        if HAS_P:
            x -= tl.load(P + offs, mask=mask, other=0.0).to(g.dtype)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp(x - lse))
        d = g * w
    if NEED_S:
        tl.store(GS + offs, d.to(GS.dtype.element_ty), mask=mask)
    if NEED_P:
        tl.store(GP + offs, (-d).to(GP.dtype.element_ty), mask=mask)


def log_partition_fwd(scores: torch.Tensor, log_proposal: torch.Tensor | None,
                      jensen: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, m = scores.shape
    out = scores.new_empty(rows)
    lse = scores.new_empty(rows, dtype=acc_dtype(scores.dtype))
    splits = splits_for(rows, m)
    per_split = triton.cdiv(m, splits)
    ws = lse.new_empty(2 * rows * splits if splits > 1 else 1)
    f64 = scores.dtype == torch.float64
    _lp_fwd_kernel[(rows * splits,)](
        scores, scores if log_proposal is None else log_proposal, out, lse, ws, m, rows, per_split, splits,
        HAS_P=log_proposal is not None, JENSEN=jensen, F64=f64, BLOCK=FWD_BLOCK,
    )
    if splits > 1:
        _lp_combine_kernel[(rows,)](ws, out, lse, m, rows, splits, JENSEN=jensen,
                                    BLOCK=triton.next_power_of_2(splits))
    return out, lse


def log_partition_bwd(grad: torch.Tensor, scores: torch.Tensor, log_proposal: torch.Tensor | None, lse: torch.Tensor,
                      jensen: bool, need_scores: bool, need_proposal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, m = scores.shape
    gs = torch.empty_like(scores) if need_scores else scores.new_empty(0)
    gp = torch.empty_like(scores) if need_proposal else scores.new_empty(0)
    if not (need_scores or need_proposal):
        return gs, gp
    g = grad.to(lse.dtype).contiguous()
    blocks = triton.cdiv(m, BWD_BLOCK)
    _lp_bwd_kernel[(rows * blocks,)](
        g, scores, scores if log_proposal is None else log_proposal, lse, gs if need_scores else scores,
        gp if need_proposal else scores, m, blocks,
        HAS_P=log_proposal is not None, JENSEN=jensen, NEED_S=need_scores, NEED_P=need_proposal, BLOCK=BWD_BLOCK,
    )
    return gs, gp
