"""One step of annealed importance sampling's MALA chains as a single op.

The state of M chains is (x, gf, glp) [M, D] (a sample and the gradients of f and of the
log-proposal there) and (f, lp, log_w, eps, alpha_sum) [M]. One call:

1. (when a proposal is pending) the Metropolis-Hastings test of x' for the target
   log pi_b = (1 - b) lp + b f: the accepted rows of the state take the proposal's values; the
   acceptance probability alpha is summed into alpha_sum and the step size adapted,
   eps <- eps * exp(gain * (alpha - target)) (gain = 0 keeps it);
2. (when noise is given) the weight update with the current sample, log_w += (b_next - b)(f - lp),
   and the next proposal x + eps grad log pi_{b_next}(x) + sqrt(2 eps) noise, which it returns.

Two implementations, one signature, chosen by ehm_fast._backend.resolve_layer ("triton" on CUDA
tensors by default, "torch" on CPU tensors; Triton there is the interpreter, for tests):
`mala_step_reference` (plain PyTorch, the oracle) and the Triton kernel of ehm_fast.kernels.sampling,
called through a torch.library custom op under torch.compile and directly otherwise. The caller
(ehm_fast.sampling.ais) hands over contiguous state in one dtype (fp32 or fp64); the energy's
gradients come from the caller, the elementwise work and the row reductions are fused here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .._backend import resolve_layer

Proposal = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # x', gf', glp', f', lp', log u


def _kernels() -> Any:
    """The Triton kernels, imported on first use: the torch path must not need triton."""
    from ehm_fast.kernels import sampling

    return sampling


def mala_step_reference(x: Tensor, gf: Tensor, glp: Tensor, f: Tensor, lp: Tensor, log_w: Tensor, eps: Tensor,
                        alpha_sum: Tensor, xp: Optional[Tensor], gfp: Optional[Tensor], glpp: Optional[Tensor],
                        fp: Optional[Tensor], lpp: Optional[Tensor], log_u: Optional[Tensor],
                        noise: Optional[Tensor], b: float, b_next: float, gain: float, target: float) -> Tensor:
    """The step in plain PyTorch, updating the state in place as the kernel does."""
    if xp is not None:
        g = (1 - b) * glp + b * gf
        gp = (1 - b) * glpp + b * gfp
        sq = ((xp - x - eps[:, None] * g) ** 2 - (x - xp - eps[:, None] * gp) ** 2).sum(1)
        log_alpha = (1 - b) * (lpp - lp) + b * (fp - f) + sq / (4 * eps)
        alpha = torch.where(log_alpha >= 0, 1.0, torch.exp(log_alpha.clamp(max=0)))
        alpha = torch.where(torch.isnan(log_alpha), 0.0, alpha)
        accept = log_u < log_alpha
        alpha_sum += alpha
        for state, proposal in ((x, xp), (gf, gfp), (glp, glpp)):
            state.copy_(torch.where(accept[:, None], proposal, state))
        f.copy_(torch.where(accept, fp, f))
        lp.copy_(torch.where(accept, lpp, lp))
        eps.mul_(torch.exp(gain * (alpha - target)))
    if noise is None:
        return x.new_empty(0)
    log_w += (b_next - b) * (f - lp)
    return x + eps[:, None] * ((1 - b_next) * glp + b_next * gf) + torch.sqrt(2 * eps)[:, None] * noise


def _kernel(x: Tensor, gf: Tensor, glp: Tensor, f: Tensor, lp: Tensor, log_w: Tensor, eps: Tensor,
            alpha_sum: Tensor, xp: Optional[Tensor], gfp: Optional[Tensor], glpp: Optional[Tensor],
            fp: Optional[Tensor], lpp: Optional[Tensor], log_u: Optional[Tensor], noise: Optional[Tensor],
            b: float, b_next: float, gain: float, target: float) -> Tensor:
    return _kernels().mala_step(x, gf, glp, f, lp, log_w, eps, alpha_sum, xp, gfp, glpp, fp, lpp, log_u, noise,
                                b, b_next, gain, target)


mala_step_op = torch.library.custom_op(
    "ehm_fast::mala_step", _kernel, mutates_args=("x", "gf", "glp", "f", "lp", "log_w", "eps", "alpha_sum")
)


@mala_step_op.register_fake
def _(x, gf, glp, f, lp, log_w, eps, alpha_sum, xp, gfp, glpp, fp, lpp, log_u, noise, b, b_next, gain, target):
    return torch.empty_like(x) if noise is not None else x.new_empty(0)


def mala_step(x: Tensor, gf: Tensor, glp: Tensor, f: Tensor, lp: Tensor, log_w: Tensor, eps: Tensor,
              alpha_sum: Tensor, proposal: Optional[Proposal], noise: Optional[Tensor], b: float, b_next: float,
              gain: float, target: float, *, backend: Optional[str] = None) -> Tensor:
    """The step on checked state (see the module docstring); `proposal` = (x', gf', glp', f', lp',
    log u) or None; returns the next proposal, or an empty tensor when `noise` is None."""
    impl = resolve_layer(backend, x.device)
    pending = proposal if proposal is not None else (None,) * 6
    args = (x, gf, glp, f, lp, log_w, eps, alpha_sum, *pending, noise, float(b), float(b_next), float(gain),
            float(target))
    if impl == "torch":
        return mala_step_reference(*args)
    return (mala_step_op if torch.compiler.is_compiling() else _kernel)(*args)
