"""Annealed importance sampling (Neal 2001) of log Z = log integral exp(f(x)) dx, with MALA moves.

The chains anneal from a normalised proposal q to the unnormalised target exp(f) through
pi_k(x) ∝ q(x)^(1 - b_k) exp(b_k f(x)), 0 = b_0 < ... < b_K = 1. From x_0 ~ q, step k = 1..K first
adds (b_k - b_{k-1}) (f(x_{k-1}) - log q(x_{k-1})) to the chain's log-weight, then moves x_{k-1} to
x_k with one Metropolis-adjusted Langevin step that leaves pi_k invariant. Then
E[exp(log_w)] = Z for every chain and log Z_hat = logsumexp(log_w) - log M; the final samples with
the self-normalised weights softmax(log_w) approximate the target. K = 1 is plain importance
sampling (plus one MALA move of the samples).

The step-size adaptation (adapt=True) runs during the chain: each chain's step size follows its own
acceptance probabilities (Robbins-Monro on log eps with gain k^-1/2 toward `target_acceptance`).
A kernel that depends on the chain's past breaks the exactness argument of AIS, so the estimate is
then only approximately unbiased (the bias fades as the step sizes settle); leave adapt off where
unbiasedness matters and tune `step_size` on a pilot run (the returned `step_size` field).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from ..losses import importance_weights
from .mala import mala_step

LogDensity = Callable[[Tensor], Tensor]
Gradients = Callable[[Tensor], tuple[Tensor, Tensor]]


class AISResult(NamedTuple):
    """log_z (0-d), log_weights [M], the final samples x (x0's shape, detached), and per chain the
    mean MALA acceptance probability and the final step size (each [M])."""

    log_z: Tensor
    log_weights: Tensor
    x: Tensor
    acceptance: Tensor
    step_size: Tensor

    def weights(self) -> tuple[Tensor, Tensor]:
        """The self-normalised weights softmax(log_weights) (detached) and their effective sample size."""
        return importance_weights(self.log_weights)

    def surrogate(self, f_final: Tensor) -> Tensor:
        """A 0-d tensor whose value is log_z and whose gradient is sum_i w_i grad f(x_i): the
        gradient of log Z with respect to the critic's parameters, from f_final = f(result.x)
        recomputed with gradients (the chain itself stays detached)."""
        w = self.weights()[0].to(f_final.dtype)
        return self.log_z.to(f_final.dtype) + (w * (f_final - f_final.detach())).sum()


def linear_schedule(n_steps: int, device: Optional[torch.device] = None) -> Tensor:
    """b_k = k / n_steps, k = 0..n_steps (fp64)."""
    return torch.arange(n_steps + 1, dtype=torch.float64, device=device) / n_steps


def _check_schedule(schedule: Union[Tensor, Sequence[float], None], n_steps: int) -> list[float]:
    if schedule is None:
        return linear_schedule(n_steps).tolist()
    b = torch.as_tensor(schedule, dtype=torch.float64).cpu()
    if b.dim() != 1 or b.numel() != n_steps + 1:
        raise ValueError(f"schedule must hold n_steps + 1 = {n_steps + 1} values b_0..b_K, got shape {tuple(b.shape)}")
    if b[0] != 0 or b[-1] != 1 or bool((b[1:] < b[:-1]).any()) or not bool(torch.isfinite(b).all()):
        raise ValueError(f"schedule must rise from b_0 = 0 to b_K = 1 without decreasing, got {b.tolist()}")
    return b.tolist()


def _check_args(x0: Tensor, n_steps: int, step_size: Union[float, Tensor], target: float) -> None:
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor of M draws from the proposal, got {type(x0).__name__}"
                        + (f" {x0.dtype}" if isinstance(x0, Tensor) else ""))
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be [M, ...] with M >= 1, got shape {tuple(x0.shape)}")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    on_device = isinstance(step_size, Tensor) and step_size.device.type != "cpu"
    eps = step_size if on_device else torch.as_tensor(step_size, dtype=torch.float64)
    if eps.dim() > 1 or (eps.dim() == 1 and eps.numel() != x0.shape[0]):
        raise ValueError(f"step_size must be a number or [M] = [{x0.shape[0]}], got shape {tuple(eps.shape)}")
    # a device tensor's values are not read: that would wait for the device (and break graph capture)
    if not on_device and (not bool((eps > 0).all()) or not bool(torch.isfinite(eps).all())):
        raise ValueError(f"step_size must be finite and > 0, got {step_size!r}")
    if not 0 < target < 1:
        raise ValueError(f"target_acceptance must lie in (0, 1), got {target!r}")


def _evaluator(f: LogDensity, log_proposal: LogDensity, grad: Optional[Gradients], x0: Tensor,
               dtype: torch.dtype) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """x [M, D] -> (f, log q [M]; grad f, grad log q [M, D]), all detached, in `dtype`."""
    m, shape = x0.shape[0], x0.shape

    def rows(name: str, value: Tensor, want: tuple[int, ...]) -> Tensor:
        if not isinstance(value, Tensor) or tuple(value.shape) != want:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must return shape {want}, got {got}")
        return value.detach().to(dtype).reshape(m, -1)

    def evaluate(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xs = x.view(shape)
        if grad is None:
            with torch.enable_grad():
                xs = xs.detach().requires_grad_(True)
                fx, lpx = f(xs), log_proposal(xs)
                gf, glp = (torch.autograd.grad(v.sum(), xs, allow_unused=True, retain_graph=i == 0)[0]
                           for i, v in enumerate((fx, lpx)))
            gf = torch.zeros_like(xs) if gf is None else gf
            glp = torch.zeros_like(xs) if glp is None else glp
        else:
            with torch.no_grad():
                fx, lpx = f(xs), log_proposal(xs)
            gf, glp = grad(xs)
        return (rows("f", fx, (m,)).view(m), rows("log_proposal", lpx, (m,)).view(m),
                rows("grad (of f)", gf, tuple(shape)), rows("grad (of log_proposal)", glp, tuple(shape)))

    return evaluate


@torch.no_grad()
def ais_log_partition(f: LogDensity, log_proposal: LogDensity, x0: Tensor, grad: Optional[Gradients] = None, *,
                      n_steps: int, step_size: Union[float, Tensor], schedule: Union[Tensor, Sequence[float], None] = None,
                      adapt: bool = False, target_acceptance: float = 0.57,
                      backend: Optional[str] = None) -> AISResult:
    """AIS estimate of log Z = log integral exp(f(x)) dx with `log_proposal` (normalised) as base.

    f, log_proposal: a batch x [M, ...] -> [M] log-densities. x0: M draws from the proposal.
    grad: x -> (grad f(x), grad log_proposal(x)), each x's shape; autograd computes them if None.
    n_steps: K annealing steps; schedule: b_0 = 0 .. b_K = 1 (K + 1 values; default linear k / K).
    step_size: MALA's eps (a number, or [M] per chain): x' = x + eps grad log pi_k(x) + sqrt(2 eps) xi,
    Metropolis-Hastings corrected (a tensor on a GPU is taken as it is: its values are not checked,
    which would wait for the device). adapt: adapt eps per chain toward target_acceptance during the
    chain (approximately unbiased only; see the module docstring). backend: the fused MALA step's
    implementation ("auto", "triton", "torch", ...; see ehm_fast.sampling.mala).

    Returns AISResult (log_z, log_weights, x, acceptance, step_size): unpack the first three with
    `log_z, log_weights, x = result[:3]`. Computed in fp32 (fp64 for fp64 x0), without gradients.
    """
    _check_args(x0, n_steps, step_size, target_acceptance)
    betas = _check_schedule(schedule, n_steps)
    dtype = torch.promote_types(x0.dtype, torch.float32)
    m = x0.shape[0]
    evaluate = _evaluator(f, log_proposal, grad, x0, dtype)
    fx, lpx, gf, glp = evaluate(x0.detach().to(dtype))
    x = x0.detach().to(dtype).reshape(m, -1).clone()  # the chain's own buffers, updated in place
    gf, glp = gf.clone(), glp.clone()
    state = (x, gf, glp, fx.clone(), lpx.clone(), x.new_zeros(m),
             torch.as_tensor(step_size, dtype=dtype, device=x.device).expand(m).clone(), x.new_zeros(m))
    step = {"target": target_acceptance, "backend": backend}
    proposal = mala_step(*state, None, torch.randn_like(x), 0.0, betas[1], 0.0, **step)
    for k in range(1, n_steps + 1):
        fp, lpp, gfp, glpp = evaluate(proposal)
        log_u = torch.log(torch.rand(m, dtype=dtype, device=x.device))
        last = k == n_steps
        proposal = mala_step(*state, (proposal, gfp, glpp, fp, lpp, log_u), None if last else torch.randn_like(x),
                             betas[k], 0.0 if last else betas[k + 1], k ** -0.5 if adapt else 0.0, **step)
    log_w, eps, alpha_sum = state[5], state[6], state[7]
    log_z = torch.logsumexp(log_w, 0) - math.log(m)
    return AISResult(log_z, log_w, x.view(x0.shape), alpha_sum / n_steps, eps)
