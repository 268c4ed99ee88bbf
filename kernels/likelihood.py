"""Triton kernels of the per-sample likelihood terms (same names and signatures as ehm_fast._C's).

Image terms (rows [B, d], log_scale a [d] accumulation-type vector): the forward splits each row
over several programs that write partial sums, so a small batch still fills the GPU; the backward
gives each program a column block and a chunk of rows, writes the pixel gradients and a partial
column sum of the log_scale gradient per chunk (added in a second, small sum: no atomics).
Code terms (rows [B, D]): one program per block of rows, elementwise backward.
Kinds and the accumulation dtype: ehm_fast.ops.contract.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ehm_fast.ops import contract
from ehm_fast.ops.contract import acc_dtype

# The kinds as Triton constants: a jitted function reads a global only if it is a tl.constexpr.
GAUSSIAN = tl.constexpr(contract.GAUSSIAN)
LAPLACE = tl.constexpr(contract.LAPLACE)
BERNOULLI = tl.constexpr(contract.BERNOULLI)
LATENT = tl.constexpr(contract.LATENT)
STD_NORMAL = tl.constexpr(contract.STD_NORMAL)
KL_STD = tl.constexpr(contract.KL_STD)
KL_PAIR = tl.constexpr(contract.KL_PAIR)
HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2 * math.pi))
LOG_2 = tl.constexpr(math.log(2.0))

MIN_PER_SPLIT = 4096  # elements of a row per forward program
FWD_BLOCK = 1024
BWD_COLS = 256  # columns per backward program
TARGET_PROGRAMS = 4096
CODE_ROWS = 16
CODE_BLOCK_D = 128
CODE_BWD_BLOCK = 1024


def image_splits(rows: int, d: int) -> int:
    """Programs per row in the forward: enough that about TARGET_PROGRAMS run, none under MIN_PER_SPLIT."""
    return max(1, min(triton.cdiv(d, MIN_PER_SPLIT), triton.cdiv(TARGET_PROGRAMS, rows)))


def image_rows_per_chunk(rows: int, d: int) -> int:
    """Rows per backward program: at least 8 (so partials stay small), at most ~TARGET_PROGRAMS programs."""
    return max(8, triton.cdiv(rows * triton.cdiv(d, BWD_COLS), TARGET_PROGRAMS))


@triton.jit
def softplus(v):
    """max(v, 0) + log1p(exp(-|v|)), finite for every finite v."""
    return tl.maximum(v, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(v)))


@triton.jit
def sigmoid(v):
    e = tl.exp(-tl.abs(v))
    return tl.where(v >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _image_term(x, m, s, KIND: tl.constexpr):
    if KIND == GAUSSIAN:
        r = x - m
        t = 0.5 * r * r * tl.exp(-2.0 * s) + s + HALF_LOG_2PI
    elif KIND == LAPLACE:
        t = tl.abs(x - m) * tl.exp(-s) + s + LOG_2
    else:
        t = softplus(m) - x * m
    return t


@triton.jit
def _image_grad(x, m, s, KIND: tl.constexpr):
    """(d/dx, d/dm, d/ds) of _image_term."""
    if KIND == GAUSSIAN:
        r = x - m
        iv = tl.exp(-2.0 * s)
        dx = r * iv
        dm = -dx
        ds = 1.0 - r * r * iv
    elif KIND == LAPLACE:
        r = x - m
        ib = tl.exp(-s)
        dx = tl.where(r > 0, ib, tl.where(r < 0, -ib, 0.0))
        dm = -dx
        ds = 1.0 - tl.abs(r) * ib
    else:
        dx = -m
        dm = sigmoid(m) - x
        ds = tl.zeros_like(m)
    return dx, dm, ds


@triton.jit
def _image_fwd_kernel(X, M, S, PART, d, per_split, splits, KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // splits
    begin = (pid % splits) * per_split
    end = tl.minimum(begin + per_split, d)
    acc = tl.zeros([BLOCK], PART.dtype.element_ty)
    for off in range(begin, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < end
        x = tl.load(X + row * d + cols, mask=mask, other=0.0).to(acc.dtype)
        m = tl.load(M + row * d + cols, mask=mask, other=0.0).to(acc.dtype)
        if KIND == BERNOULLI:
            s = x
        else:
            s = tl.load(S + cols, mask=mask, other=0.0)
        acc += tl.where(mask, _image_term(x, m, s, KIND), 0.0)
    tl.store(PART + pid, tl.sum(acc, axis=0))


@triton.jit
def _image_bwd_kernel(GRAD, X, M, S, GX, GM, GS_PART, B, d, rows_per_chunk, KIND: tl.constexpr, NEED_X: tl.constexpr,
                      NEED_M: tl.constexpr, NEED_S: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    chunk = tl.program_id(1).to(tl.int64)
    mask = cols < d
    if KIND == BERNOULLI:
        s = tl.zeros([BLOCK], GRAD.dtype.element_ty)
    else:
        s = tl.load(S + cols, mask=mask, other=0.0)
    acc = tl.zeros([BLOCK], GRAD.dtype.element_ty)
    r0 = chunk * rows_per_chunk
    r1 = tl.minimum(r0 + rows_per_chunk, B)
    for row in range(r0, r1):
        g = tl.load(GRAD + row)
        offs = row * d + cols
        x = tl.load(X + offs, mask=mask, other=0.0).to(g.dtype)
        m = tl.load(M + offs, mask=mask, other=0.0).to(g.dtype)
        dx, dm, ds = _image_grad(x, m, s, KIND)
        if NEED_X:
            tl.store(GX + offs, (g * dx).to(GX.dtype.element_ty), mask=mask)
        if NEED_M:
            tl.store(GM + offs, (g * dm).to(GM.dtype.element_ty), mask=mask)
        acc += g * ds
    if NEED_S:
        tl.store(GS_PART + chunk * d + cols, acc, mask=mask)


def image_nll_fwd(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor | None, kind: int) -> torch.Tensor:
    rows, d = x.shape
    splits = image_splits(rows, d)
    per_split = triton.cdiv(d, splits)
    part = x.new_empty((rows, splits), dtype=acc_dtype(x.dtype))
    _image_fwd_kernel[(rows * splits,)](
        x, mean, x if log_scale is None else log_scale, part, d, per_split, splits, KIND=kind, BLOCK=FWD_BLOCK
    )
    return part.view(rows) if splits == 1 else part.sum(1)


def image_nll_bwd(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor | None, kind: int,
                  need_x: bool, need_mean: bool, need_scale: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, d = x.shape
    acc = acc_dtype(x.dtype)
    need_scale = need_scale and log_scale is not None
    gx = torch.empty_like(x) if need_x else x.new_empty(0)
    gm = torch.empty_like(x) if need_mean else x.new_empty(0)
    if not (need_x or need_mean or need_scale):
        return gx, gm, x.new_empty(0, dtype=acc)
    per_chunk = image_rows_per_chunk(rows, d)
    chunks = triton.cdiv(rows, per_chunk)
    part = x.new_empty((chunks, d) if need_scale else (1,), dtype=acc)
    g = grad.to(acc).contiguous()
    _image_bwd_kernel[(triton.cdiv(d, BWD_COLS), chunks)](
        g, x, mean, x if log_scale is None else log_scale, gx if need_x else x, gm if need_mean else x, part,
        rows, d, per_chunk, KIND=kind, NEED_X=need_x, NEED_M=need_mean, NEED_S=need_scale, BLOCK=BWD_COLS,
    )
    gs = (part.view(d) if chunks == 1 else part.sum(0)) if need_scale else x.new_empty(0, dtype=acc)
    return gx, gm, gs


@triton.jit
def _code_term(a, b, c, e, KIND: tl.constexpr):
    if KIND == LATENT:  # -log N(a; b, exp(c))
        r = a - b
        t = 0.5 * r * r * tl.exp(-c) + 0.5 * c + HALF_LOG_2PI
    elif KIND == STD_NORMAL:  # -log N(a; 0, 1)
        t = 0.5 * a * a + HALF_LOG_2PI
    elif KIND == KL_STD:  # KL(N(a, exp(b)) || N(0, 1))
        t = 0.5 * (a * a + tl.exp(b) - 1.0 - b)
    else:  # KL(N(a, exp(b)) || N(c, exp(e)))
        r = a - c
        t = 0.5 * (e - b + tl.exp(b - e) + r * r * tl.exp(-e) - 1.0)
    return t


@triton.jit
def _code_grad(a, b, c, e, KIND: tl.constexpr):
    zero = tl.zeros_like(a)
    if KIND == LATENT:
        r = a - b
        iv = tl.exp(-c)
        da = r * iv
        db = -da
        dc = 0.5 - 0.5 * r * r * iv
        de = zero
    elif KIND == STD_NORMAL:
        da = a
        db = zero
        dc = zero
        de = zero
    elif KIND == KL_STD:
        da = a
        db = 0.5 * (tl.exp(b) - 1.0)
        dc = zero
        de = zero
    else:
        r = a - c
        iv2 = tl.exp(-e)
        ratio = tl.exp(b - e)
        da = r * iv2
        db = 0.5 * (ratio - 1.0)
        dc = -da
        de = 0.5 * (1.0 - ratio - r * r * iv2)
    return da, db, dc, de


@triton.jit
def _load_operand(P, offs, mask, dtype: tl.constexpr, USED: tl.constexpr):
    if USED:
        v = tl.load(P + offs, mask=mask, other=0.0).to(dtype)
    else:
        v = tl.zeros(offs.shape, dtype)
    return v


@triton.jit
def _code_fwd_kernel(A, Bop, C, E, BASE, OUT, B, D, KIND: tl.constexpr, HAS_BASE: tl.constexpr, F64: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    if F64:
        acc = tl.zeros([ROWS, BLOCK_D], tl.float64)
    else:
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    acc_t = acc.dtype
    for off in range(0, D, BLOCK_D):
        cols = off + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        a = _load_operand(A, offs, mask, acc_t, True)
        b = _load_operand(Bop, offs, mask, acc_t, KIND != STD_NORMAL)
        c = _load_operand(C, offs, mask, acc_t, KIND == LATENT or KIND == KL_PAIR)
        e = _load_operand(E, offs, mask, acc_t, KIND == KL_PAIR)
        acc += tl.where(mask, _code_term(a, b, c, e, KIND), 0.0)
    total = tl.sum(acc, axis=1)
    if HAS_BASE:
        total += tl.load(BASE + rows, mask=rmask, other=0.0)
    tl.store(OUT + rows, total.to(OUT.dtype.element_ty), mask=rmask)


@triton.jit
def _code_bwd_kernel(GRAD, A, Bop, C, E, GA, GB, GC, GE, n, D, KIND: tl.constexpr, NEED_A: tl.constexpr,
                     NEED_B: tl.constexpr, NEED_C: tl.constexpr, NEED_E: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(GRAD + offs // D, mask=mask, other=0.0)
    a = _load_operand(A, offs, mask, g.dtype, True)
    b = _load_operand(Bop, offs, mask, g.dtype, KIND != STD_NORMAL)
    c = _load_operand(C, offs, mask, g.dtype, KIND == LATENT or KIND == KL_PAIR)
    e = _load_operand(E, offs, mask, g.dtype, KIND == KL_PAIR)
    da, db, dc, de = _code_grad(a, b, c, e, KIND)
    if NEED_A:
        tl.store(GA + offs, (g * da).to(GA.dtype.element_ty), mask=mask)
    if NEED_B:
        tl.store(GB + offs, (g * db).to(GB.dtype.element_ty), mask=mask)
    if NEED_C:
        tl.store(GC + offs, (g * dc).to(GC.dtype.element_ty), mask=mask)
    if NEED_E:
        tl.store(GE + offs, (g * de).to(GE.dtype.element_ty), mask=mask)


def code_nll_fwd(a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor | None, e: torch.Tensor | None,
                 base: torch.Tensor | None, kind: int) -> torch.Tensor:
    rows, d = a.shape
    out = a.new_empty(rows)
    pick = lambda t: a if t is None else t  # noqa: E731 (an unread operand still needs a pointer)
    _code_fwd_kernel[(triton.cdiv(rows, CODE_ROWS),)](
        a, pick(b), pick(c), pick(e), pick(base), out, rows, d, KIND=kind, HAS_BASE=base is not None,
        F64=a.dtype == torch.float64, ROWS=CODE_ROWS, BLOCK_D=min(CODE_BLOCK_D, triton.next_power_of_2(d)),
    )
    return out


def code_nll_bwd(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor | None,
                 e: torch.Tensor | None, kind: int, need_a: bool, need_b: bool, need_c: bool,
                 need_e: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, d = a.shape
    needs = (need_a, need_b and b is not None, need_c and c is not None, need_e and e is not None)
    grads = tuple(torch.empty_like(a) if need else a.new_empty(0) for need in needs)
    if not any(needs):
        return grads
    pick = lambda t: a if t is None or t.numel() == 0 else t  # noqa: E731
    g = grad.to(acc_dtype(a.dtype)).contiguous()
    _code_bwd_kernel[(triton.cdiv(rows * d, CODE_BWD_BLOCK),)](
        g, a, pick(b), pick(c), pick(e), *(pick(t) for t in grads), rows * d, d, KIND=kind, NEED_A=needs[0],
        NEED_B=needs[1], NEED_C=needs[2], NEED_E=needs[3], BLOCK=CODE_BWD_BLOCK,
    )
    return grads
