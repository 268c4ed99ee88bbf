"""Triton kernel of one MALA step of annealed importance sampling (the op is ehm_fast.sampling.mala).

The chains are the M rows of a dense [M, D] state. One program per row does, for the annealed
target log pi_b(x) = (1 - b) log_proposal(x) + b f(x), whose gradient (1 - b) glp + b gf it forms
from the caller's two gradients:

1. ACCEPT: the Metropolis-Hastings test of the pending proposal x' (made from x with step size
   eps): log alpha = log pi_b(x') - log pi_b(x) + (|x' - x - eps g|^2 - |x - x' - eps g'|^2) / (4 eps)
   (a row reduction over D); accept when log u < log alpha; a NaN log alpha is a rejection with
   alpha = 0. The state (x, gf, glp, f, lp) takes the proposal's rows where accepted (stores
   masked by the acceptance: a rejected row writes nothing). alpha is added to ALPHA_SUM and
   eps <- eps * exp(gain * (alpha - target)) (gain = 0: no adaptation).
2. PROPOSE: the weight update with the current sample, log_w += (b_next - b) (f - lp), and the next
   proposal for target pi_{b_next}: out = x + eps (grad log pi_{b_next}(x)) + sqrt(2 eps) noise.

Everything is in ACC (fp32, fp64 for fp64 state): the op hands over its state already in that
dtype. The scalars are fp64 arguments (a plain float argument arrives as fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dtypes import tl_acc

MAX_BLOCK = 2048


@triton.jit
def _mala_step_kernel(X, GF, GLP, F, LP, LOGW, EPS, ALPHA_SUM,
                      XP, GFP, GLPP, FP, LPP, LOGU, NOISE, OUT,
                      D, b: tl.float64, b_next: tl.float64, gain: tl.float64, target: tl.float64,
                      ACCEPT: tl.constexpr, PROPOSE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    lanes = tl.arange(0, BLOCK)
    b = tl.full([], b, ACC)
    b_next = tl.full([], b_next, ACC)
    gain = tl.full([], gain, ACC)
    target = tl.full([], target, ACC)
    eps = tl.load(EPS + row)
    f = tl.load(F + row)
    lp = tl.load(LP + row)
    accept = False
    if ACCEPT:
        sq = tl.zeros([BLOCK], ACC)
        for start in range(0, D, BLOCK):
            idx = start + lanes
            mask = idx < D
            x = tl.load(X + base + idx, mask=mask, other=0.0)
            xp = tl.load(XP + base + idx, mask=mask, other=0.0)
            g = (1.0 - b) * tl.load(GLP + base + idx, mask=mask, other=0.0) + b * tl.load(GF + base + idx, mask=mask, other=0.0)
            gp = (1.0 - b) * tl.load(GLPP + base + idx, mask=mask, other=0.0) + b * tl.load(GFP + base + idx, mask=mask, other=0.0)
            fwd = xp - x - eps * g
            bwd = x - xp - eps * gp
            sq += fwd * fwd - bwd * bwd
        fp = tl.load(FP + row)
        lpp = tl.load(LPP + row)
        log_alpha = (1.0 - b) * (lpp - lp) + b * (fp - f) + tl.sum(sq, 0) / (4.0 * eps)
        alpha = tl.where(log_alpha >= 0, 1.0, tl.exp(tl.minimum(log_alpha, 0.0)))
        alpha = tl.where(log_alpha == log_alpha, alpha, 0.0)  # NaN: rejected
        accept = tl.load(LOGU + row) < log_alpha
        tl.store(ALPHA_SUM + row, tl.load(ALPHA_SUM + row) + alpha)
        f = tl.where(accept, fp, f)
        lp = tl.where(accept, lpp, lp)
        tl.store(F + row, f)
        tl.store(LP + row, lp)
        eps = eps * tl.exp(gain * (alpha - target))
        tl.store(EPS + row, eps)
    if PROPOSE:
        tl.store(LOGW + row, tl.load(LOGW + row) + (b_next - b) * (f - lp))
    if ACCEPT or PROPOSE:
        scale = tl.sqrt(2.0 * eps)
        for start in range(0, D, BLOCK):
            idx = start + lanes
            mask = idx < D
            x = tl.load(X + base + idx, mask=mask)
            gf = tl.load(GF + base + idx, mask=mask)
            glp = tl.load(GLP + base + idx, mask=mask)
            if ACCEPT:
                taken = mask & (tl.full([BLOCK], 0, tl.int32) + accept.to(tl.int32) != 0)
                x = tl.where(accept, tl.load(XP + base + idx, mask=mask), x)
                gf = tl.where(accept, tl.load(GFP + base + idx, mask=mask), gf)
                glp = tl.where(accept, tl.load(GLPP + base + idx, mask=mask), glp)
                tl.store(X + base + idx, x, mask=taken)
                tl.store(GF + base + idx, gf, mask=taken)
                tl.store(GLP + base + idx, glp, mask=taken)
            if PROPOSE:
                noise = tl.load(NOISE + base + idx, mask=mask)
                out = x + eps * ((1.0 - b_next) * glp + b_next * gf) + scale * noise
                tl.store(OUT + base + idx, out, mask=mask)


def mala_step(x: torch.Tensor, gf: torch.Tensor, glp: torch.Tensor, f: torch.Tensor, lp: torch.Tensor,
              log_w: torch.Tensor, eps: torch.Tensor, alpha_sum: torch.Tensor,
              xp: torch.Tensor | None, gfp: torch.Tensor | None, glpp: torch.Tensor | None,
              fp: torch.Tensor | None, lpp: torch.Tensor | None, log_u: torch.Tensor | None,
              noise: torch.Tensor | None, b: float, b_next: float, gain: float, target: float) -> torch.Tensor:
    """Updates the state (x, gf, glp [M, D]; f, lp, log_w, eps, alpha_sum [M]) in place and returns
    the next proposal [M, D] (an empty tensor when `noise` is None). The pending proposal
    (xp, gfp, glpp, fp, lpp, log_u) is tested when xp is given."""
    accept, propose = xp is not None, noise is not None
    out = torch.empty_like(x) if propose else x.new_empty(0)
    m, d = x.shape
    if m == 0 or not (accept or propose):
        return out
    block = min(triton.next_power_of_2(max(d, 1)), MAX_BLOCK)
    _mala_step_kernel[(m,)](
        x, gf, glp, f, lp, log_w, eps, alpha_sum,
        xp if accept else x, gfp if accept else gf, glpp if accept else glp, fp if accept else f,
        lpp if accept else lp, log_u if accept else f, noise if propose else x, out if propose else x,
        d, b, b_next, gain, target, ACCEPT=accept, PROPOSE=propose, ACC=tl_acc(x.dtype), BLOCK=block,
        num_warps=8 if block >= MAX_BLOCK else 4,  # 8 elements per thread per array: no spills in fp64
    )
    return out
