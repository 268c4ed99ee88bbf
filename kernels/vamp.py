"""Triton kernels of the VampPrior -log p(z) = log K - logsumexp_k log N(z; mu_k, exp(logvar_k)).

A program takes a tile of BB codes and walks over the K components in tiles of BK, computing the
[BB, BK] log-densities from [BB, BK, D] terms held only in registers. The forward keeps an online
(max, sum) per code and saves its logsumexp; the backward recomputes the log-densities and the
responsibilities exp(log N - lse): one kernel for the code gradient (programs over codes), one for
the mu_k/logvar_k gradients (programs over component tiles and chunks of the batch, each chunk's
partial sums added afterwards: no atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ehm_fast.ops.contract import acc_dtype

HALF_LOG_2PI = tl.constexpr(0.5 * math.log(2 * math.pi))
TILE_ELEMENTS = 4096  # BB * BK * BD per program: 8192 spills registers in the backward (ptxas, sm_90, D=100)
TARGET_PROGRAMS = 1024


def _tiles(d: int) -> tuple[int, int, int]:
    bd = triton.next_power_of_2(d)
    side = 1
    while side * 2 * side * 2 * bd <= TILE_ELEMENTS and side < 16:
        side *= 2
    return side, side, bd


def batch_chunks(rows: int, k: int, bb: int, bk: int) -> int:
    """Chunks of the batch for the mu/logvar gradients: enough programs to fill the GPU."""
    tiles = triton.cdiv(rows, bb)
    return max(1, min(tiles, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(k, bk))))


@triton.jit
def _component_tile(MU, LV, ks, kmask, ds, dmask, D, acc_t: tl.constexpr):
    """mu, exp(-lv) ([BK, BD], zero off the edge) and sum_d (lv/2 + log(2 pi)/2) per component ([BK])."""
    mask = kmask[:, None] & dmask[None, :]
    offs = ks[:, None] * D + ds[None, :]
    mu = tl.load(MU + offs, mask=mask, other=0.0).to(acc_t)
    lv = tl.load(LV + offs, mask=mask, other=0.0).to(acc_t)
    iv = tl.where(mask, tl.exp(-lv), 0.0)
    const = tl.sum(tl.where(mask, 0.5 * lv + HALF_LOG_2PI, 0.0), axis=1)
    return mu, iv, const


@triton.jit
def _neg_log_normal(z, mu, iv, const):
    """-log N(z_b; mu_k, .) for a [BB, BD] tile of codes and a [BK, BD] tile of components: [BB, BK]."""
    diff = z[:, None, :] - mu[None, :, :]
    return 0.5 * tl.sum(diff * diff * iv[None, :, :], axis=2) + const[None, :]


@triton.jit
def _load_codes(Z, rows, rmask, ds, dmask, D, acc_t: tl.constexpr):
    return tl.load(Z + rows[:, None] * D + ds[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0).to(acc_t)


@triton.jit
def _responsibility(t, lse, g, valid):
    """g_b * exp(-t - lse_b) where valid, 0 elsewhere and for rows whose lse is -inf."""
    w = tl.exp(-t - lse[:, None])
    keep = valid & (lse[:, None] != float("-inf"))
    return tl.where(keep, w * g[:, None], 0.0)


@triton.jit
def _vamp_fwd_kernel(Z, MU, LV, BASE, OUT, LSE, B, K, D, HAS_BASE: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr,
                     BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < B
    ds = tl.arange(0, BD)
    dmask = ds < D
    acc_t = LSE.dtype.element_ty
    z = _load_codes(Z, rows, rmask, ds, dmask, D, acc_t)
    m = tl.full([BB], float("-inf"), acc_t)
    s = tl.zeros([BB], acc_t)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        mu, iv, const = _component_tile(MU, LV, ks, kmask, ds, dmask, D, acc_t)
        x = tl.where(kmask[None, :], -_neg_log_normal(z, mu, iv, const), float("-inf"))
        new_m = tl.maximum(m, tl.max(x, axis=1))
        scale = tl.where(m == float("-inf"), 0.0, tl.exp(m - new_m))
        terms = tl.where(x == float("-inf"), 0.0, tl.exp(x - new_m[:, None]))
        s = s * scale + tl.sum(terms, axis=1)
        m = new_m
    lse = m + tl.log(s)
    out = tl.log(tl.zeros([BB], acc_t) + K) - lse
    if HAS_BASE:
        out += tl.load(BASE + rows, mask=rmask, other=0.0)
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(OUT + rows, out.to(OUT.dtype.element_ty), mask=rmask)


@triton.jit
def _vamp_bwd_z_kernel(GRAD, Z, MU, LV, LSE, GZ, B, K, D, BB: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BB + tl.arange(0, BB)
    rmask = rows < B
    ds = tl.arange(0, BD)
    dmask = ds < D
    acc_t = LSE.dtype.element_ty
    z = _load_codes(Z, rows, rmask, ds, dmask, D, acc_t)
    g = tl.load(GRAD + rows, mask=rmask, other=0.0)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    acc = tl.zeros([BB, BD], acc_t)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < K
        mu, iv, const = _component_tile(MU, LV, ks, kmask, ds, dmask, D, acc_t)
        q = _responsibility(_neg_log_normal(z, mu, iv, const), lse, g, rmask[:, None] & kmask[None, :])
        diff = z[:, None, :] - mu[None, :, :]
        acc += tl.sum(q[:, :, None] * diff * iv[None, :, :], axis=1)
    tl.store(GZ + rows[:, None] * D + ds[None, :], acc.to(GZ.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _vamp_bwd_k_kernel(GRAD, Z, MU, LV, LSE, GMU, GLV, B, K, D, rows_per_chunk, NEED_MU: tl.constexpr,
                       NEED_LV: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    ks = tl.program_id(0).to(tl.int64) * BK + tl.arange(0, BK)
    chunk = tl.program_id(1).to(tl.int64)
    kmask = ks < K
    ds = tl.arange(0, BD)
    dmask = ds < D
    acc_t = LSE.dtype.element_ty
    mu, iv, const = _component_tile(MU, LV, ks, kmask, ds, dmask, D, acc_t)
    acc_mu = tl.zeros([BK, BD], acc_t)
    acc_lv = tl.zeros([BK, BD], acc_t)
    r0 = chunk * rows_per_chunk
    r1 = tl.minimum(r0 + rows_per_chunk, B)
    for b0 in range(r0, r1, BB):
        rows = b0 + tl.arange(0, BB)
        rmask = rows < r1
        z = _load_codes(Z, rows, rmask, ds, dmask, D, acc_t)
        g = tl.load(GRAD + rows, mask=rmask, other=0.0)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        q = _responsibility(_neg_log_normal(z, mu, iv, const), lse, g, rmask[:, None] & kmask[None, :])
        diff = z[:, None, :] - mu[None, :, :]
        if NEED_MU:
            acc_mu -= tl.sum(q[:, :, None] * diff * iv[None, :, :], axis=0)
        if NEED_LV:
            acc_lv += tl.sum(q[:, :, None] * (0.5 - 0.5 * diff * diff * iv[None, :, :]), axis=0)
    offs = chunk * K * D + ks[:, None] * D + ds[None, :]
    mask = kmask[:, None] & dmask[None, :]
    if NEED_MU:
        tl.store(GMU + offs, acc_mu, mask=mask)
    if NEED_LV:
        tl.store(GLV + offs, acc_lv, mask=mask)


def vamp_fwd(z: torch.Tensor, mu_k: torch.Tensor, logvar_k: torch.Tensor,
             base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    rows, d = z.shape
    k = mu_k.shape[0]
    bb, bk, bd = _tiles(d)
    out = z.new_empty(rows)
    lse = z.new_empty(rows, dtype=acc_dtype(z.dtype))
    _vamp_fwd_kernel[(triton.cdiv(rows, bb),)](
        z, mu_k, logvar_k, lse if base is None else base, out, lse, rows, k, d, HAS_BASE=base is not None,
        BB=bb, BK=bk, BD=bd,
    )
    return out, lse


def vamp_bwd(grad: torch.Tensor, z: torch.Tensor, mu_k: torch.Tensor, logvar_k: torch.Tensor, lse: torch.Tensor,
             need_z: bool, need_mu: bool, need_logvar: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, d = z.shape
    k = mu_k.shape[0]
    bb, bk, bd = _tiles(d)
    g = grad.to(lse.dtype).contiguous()
    gz = torch.empty_like(z) if need_z else z.new_empty(0)
    gmu = glv = z.new_empty(0)
    if need_z:
        _vamp_bwd_z_kernel[(triton.cdiv(rows, bb),)](g, z, mu_k, logvar_k, lse, gz, rows, k, d, BB=bb, BK=bk, BD=bd)
    if need_mu or need_logvar:
        chunks = batch_chunks(rows, k, bb, bk)
        per_chunk = triton.cdiv(triton.cdiv(rows, chunks), bb) * bb
        chunks = triton.cdiv(rows, per_chunk)
        pmu = lse.new_empty((chunks, k, d) if need_mu else (1,))
        plv = lse.new_empty((chunks, k, d) if need_logvar else (1,))
        _vamp_bwd_k_kernel[(triton.cdiv(k, bk), chunks)](
            g, z, mu_k, logvar_k, lse, pmu, plv, rows, k, d, per_chunk, NEED_MU=need_mu, NEED_LV=need_logvar,
            BB=bb, BK=bk, BD=bd,
        )
        if need_mu:
            gmu = pmu.sum(0).to(z.dtype)
        if need_logvar:
            glv = plv.sum(0).to(z.dtype)
    return gz, gmu, glv
