"""The EHM losses as differentiable ops (see docs/math.md for the formulas).

Every op takes `backend=` ("auto", "cuda", "triton", "cpu", "torch"; see `ehm_fast.set_backend`)
and checks its arguments, raising a ValueError/TypeError that names the argument at fault.
Accumulation is in fp32 (fp64 for fp64 inputs); results come back in the inputs' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._backend import resolve
from ._checks import check_float, check_same_device
from .likelihood import (
    bernoulli_nll,
    gaussian_nll,
    kl_normal,
    laplace_nll,
    latent_nll,
    sleep_loss,
    std_normal_nll,
    vamp_prior_nll,
    wake_loss,
)
from .ops import log_partition as _lp

ESTIMATORS = ("importance", "jensen")

__all__ = [
    "log_partition",
    "log_partition_gaussian",
    "importance_weights",
    "critic_loss",
    "gaussian_nll",
    "laplace_nll",
    "bernoulli_nll",
    "latent_nll",
    "std_normal_nll",
    "kl_normal",
    "vamp_prior_nll",
    "wake_loss",
    "sleep_loss",
]


def _check_estimator(estimator: str) -> bool:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return estimator == "jensen"


def _scores_and_proposal(scores: Tensor, log_proposal: Tensor | None) -> tuple[Tensor, Tensor | None]:
    check_float("scores", scores)
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension [..., M], got a 0-d tensor")
    if log_proposal is not None:
        check_float("log_proposal", log_proposal)
        check_same_device(scores=scores, log_proposal=log_proposal)
        try:
            shape = torch.broadcast_shapes(scores.shape, log_proposal.shape)
        except RuntimeError:
            raise ValueError(
                f"log_proposal of shape {tuple(log_proposal.shape)} does not broadcast to scores of shape "
                f"{tuple(scores.shape)}"
            ) from None
        if shape != scores.shape:
            raise ValueError(
                f"log_proposal of shape {tuple(log_proposal.shape)} would broadcast scores {tuple(scores.shape)} "
                f"to {tuple(shape)}; it must broadcast to the shape of scores"
            )
    if scores.shape[-1] == 0:
        raise ValueError("scores has M = 0 samples in its last dimension; the estimate needs at least one")
    return scores, log_proposal


def log_partition(
    scores: Tensor, log_proposal: Tensor | None = None, *, estimator: str = "importance", backend: str | None = None
) -> Tensor:
    """Estimate log Z of the critic from M generated samples along the last dimension.

    estimator="importance": logsumexp(scores - log_proposal, -1) - log M;
    estimator="jensen": mean(scores - log_proposal, -1) (the WGAN bound).
    `log_proposal` is log p(x_i|z_i) of each sample (broadcastable to `scores`, or None for 0).
    Returns shape scores.shape[:-1] in the promoted dtype of the inputs.
    """
    jensen = _check_estimator(estimator)
    scores, log_proposal = _scores_and_proposal(scores, log_proposal)
    impl = resolve(backend, scores.device)
    if impl == "torch":
        return reference.log_partition(scores, log_proposal, estimator)
    dtype = scores.dtype if log_proposal is None else torch.promote_types(scores.dtype, log_proposal.dtype)
    lead, m = scores.shape[:-1], scores.shape[-1]
    s = scores.to(dtype).reshape(-1, m).contiguous()
    p = None if log_proposal is None else log_proposal.to(dtype).expand(scores.shape).reshape(-1, m).contiguous()
    if s.shape[0] == 0:
        return s.new_empty(lead)
    out, _ = _lp.log_partition(s, p, jensen, impl)
    return out.reshape(lead)


def log_partition_gaussian(
    scores: Tensor, x: Tensor, mean: Tensor, log_scale: Tensor | float, *, backend: str | None = None
) -> Tensor:
    """Fused importance estimate with a Gaussian decoder as proposal.

    scores: [M] critic values of the generated images x [M, ...] with decoder means `mean` and
    log standard deviation `log_scale` (a scalar, [C, 1, 1] or [C, H, W]). log p(x_i|z_i) is the
    Gaussian log-likelihood of each whole image, reduced in the pass that reads x and mean.
    Returns a 0-d tensor: logsumexp_i(scores_i - log p(x_i|z_i)) - log M.
    """
    check_float("scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be [M], got shape {tuple(scores.shape)}")
    check_float("x", x)
    if x.dim() < 2 or x.shape[0] != scores.shape[0]:
        raise ValueError(f"x must be [M, ...] with M = {scores.shape[0]} (the length of scores), got {tuple(x.shape)}")
    nll = gaussian_nll(x, mean, log_scale, backend=backend)
    return log_partition(scores, -nll, backend=backend)


def importance_weights(scores: Tensor, log_proposal: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Self-normalised weights softmax(scores - log_proposal) over the last dim, and the effective
    sample size 1 / sum w^2 per row (a diagnostic; fp32, no gradient)."""
    scores, log_proposal = _scores_and_proposal(scores, log_proposal)
    with torch.no_grad():
        return reference.importance_weights(scores, log_proposal)


def critic_loss(
    f_real: Tensor,
    f_fake: Tensor,
    log_proposal: Tensor | None = None,
    *,
    estimator: str = "importance",
    backend: str | None = None,
) -> Tensor:
    """-mean(f_real) + log Z_hat(f_fake): the critic's cross-entropy to the data (0-d tensor)."""
    check_float("f_real", f_real)
    if f_real.numel() == 0:
        raise ValueError("f_real is empty: the critic loss needs at least one real sample")
    check_same_device(f_real=f_real, f_fake=f_fake)
    proposal = None if log_proposal is None else log_proposal.reshape(-1)
    return -f_real.mean() + log_partition(f_fake.reshape(-1), proposal, estimator=estimator, backend=backend)
