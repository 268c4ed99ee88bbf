"""Plain-PyTorch references of every op: the oracle of the tests and the "torch" backend.

Each function has the signature of its public op in `ehm_fast.losses` (without `backend=`) and
takes inputs that have already been checked. Formulas: docs/math.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import reduce

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(terms: Tensor) -> Tensor:
    return terms.flatten(1).sum(1)


def log_partition(scores: Tensor, log_proposal: Tensor | None = None, estimator: str = "importance") -> Tensor:
    z = scores if log_proposal is None else scores - log_proposal
    if estimator == "jensen":
        return z.mean(-1)
    # torch.logsumexp's gradient on an all -inf row is exp(-inf - -inf) = NaN; the contract (and
    # every kernel) gives that row -inf with zero gradient, so it sums zeros that carry no gradient
    empty = torch.isneginf(z).all(-1, keepdim=True)
    lse = torch.logsumexp(torch.where(empty, torch.zeros_like(z), z), dim=-1)
    return torch.where(empty.squeeze(-1), float("-inf"), lse) - math.log(z.shape[-1])


def importance_weights(scores: Tensor, log_proposal: Tensor | None = None) -> tuple[Tensor, Tensor]:
    z = (scores if log_proposal is None else scores - log_proposal).float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    w = torch.where(torch.isneginf(lse), torch.zeros_like(z), torch.exp(z - lse))
    return w, 1.0 / (w * w).sum(-1)


def gaussian_nll(x: Tensor, mean: Tensor, log_scale: Tensor, reduction: str = "none") -> Tensor:
    terms = 0.5 * (x - mean) ** 2 * torch.exp(-2 * log_scale) + log_scale + HALF_LOG_2PI
    return reduce(_per_sample(terms.expand_as(x)), reduction)


def laplace_nll(x: Tensor, loc: Tensor, log_scale: Tensor, reduction: str = "none") -> Tensor:
    terms = (x - loc).abs() * torch.exp(-log_scale) + log_scale + math.log(2.0)
    return reduce(_per_sample(terms.expand_as(x)), reduction)


def bernoulli_nll(x: Tensor, logits: Tensor, reduction: str = "none") -> Tensor:
    return reduce(_per_sample(torch.nn.functional.softplus(logits) - x * logits), reduction)


def latent_nll(z: Tensor, mu: Tensor, logvar: Tensor, reduction: str = "none") -> Tensor:
    terms = 0.5 * (z - mu) ** 2 * torch.exp(-logvar) + 0.5 * logvar + HALF_LOG_2PI
    return reduce(_per_sample(terms), reduction)


def std_normal_nll(z: Tensor, reduction: str = "none") -> Tensor:
    return reduce(_per_sample(0.5 * z * z + HALF_LOG_2PI), reduction)


def kl_normal(
    mu: Tensor, logvar: Tensor, mu2: Tensor | None = None, logvar2: Tensor | None = None, reduction: str = "none"
) -> Tensor:
    if mu2 is None:
        terms = 0.5 * (mu * mu + torch.exp(logvar) - 1 - logvar)
    else:
        terms = 0.5 * (logvar2 - logvar + (torch.exp(logvar) + (mu - mu2) ** 2) * torch.exp(-logvar2) - 1)
    return reduce(_per_sample(terms), reduction)


def vamp_prior_nll(z: Tensor, mu_k: Tensor, logvar_k: Tensor, reduction: str = "none") -> Tensor:
    # [B, K, D]: the memory the fused kernels avoid.
    diff = z[:, None, :] - mu_k[None]
    log_n = -(0.5 * diff * diff * torch.exp(-logvar_k)[None] + 0.5 * logvar_k[None] + HALF_LOG_2PI).sum(-1)
    return reduce(math.log(mu_k.shape[0]) - torch.logsumexp(log_n, dim=1), reduction)


def wake_loss(
    x: Tensor,
    x_mean: Tensor,
    log_scale: Tensor | None,
    z: Tensor,
    likelihood: str = "gaussian",
    prior: str | tuple[Tensor, Tensor] = "normal",
    reduction: str = "none",
) -> Tensor:
    if likelihood == "gaussian":
        rec = gaussian_nll(x, x_mean, log_scale)
    elif likelihood == "laplace":
        rec = laplace_nll(x, x_mean, log_scale)
    else:
        rec = bernoulli_nll(x, x_mean)
    pri = std_normal_nll(z) if isinstance(prior, str) else vamp_prior_nll(z, *prior)
    return reduce(rec + pri, reduction)


def sleep_loss(z: Tensor, mu: Tensor, logvar: Tensor, critic_scores: Tensor, reduction: str = "none") -> Tensor:
    return reduce(latent_nll(z, mu, logvar) - critic_scores.reshape(z.shape[0]), reduction)
