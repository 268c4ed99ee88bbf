"""Per-sample likelihood terms of the wake and sleep phases (re-exported by `ehm_fast.losses`).

Each returns -log p per sample, summed over all non-batch dimensions ([B] for reduction="none").
"""

from __future__ import annotations

from torch import Tensor

from . import reference
from ._backend import resolve
from ._checks import (
    check_batched,
    check_float,
    check_reduction,
    check_same_device,
    check_same_shape,
    image_scale,
    reduce,
)

LIKELIHOODS = ("gaussian", "laplace", "bernoulli")


def _pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    check_float(name_a, a)
    check_float(name_b, b)
    check_batched(name_a, a)
    check_same_shape(name_a, a, name_b, b)
    check_same_device(**{name_a: a, name_b: b})


def gaussian_nll(
    x: Tensor, mean: Tensor, log_scale: Tensor | float, *, reduction: str = "none", backend: str | None = None
) -> Tensor:
    """-log N(x; mean, exp(log_scale)^2) per sample; log_scale a scalar, [C,1,1] or [C,H,W]."""
    _pair("x", x, "mean", mean)
    check_reduction(reduction)
    ls = image_scale(log_scale, x)
    check_same_device(x=x, log_scale=ls)
    resolve(backend, x.device)
    return reference.gaussian_nll(x, mean, ls, reduction)


def laplace_nll(
    x: Tensor, loc: Tensor, log_scale: Tensor | float, *, reduction: str = "none", backend: str | None = None
) -> Tensor:
    """-log Laplace(x; loc, exp(log_scale)) per sample."""
    _pair("x", x, "loc", loc)
    check_reduction(reduction)
    ls = image_scale(log_scale, x)
    check_same_device(x=x, log_scale=ls)
    resolve(backend, x.device)
    return reference.laplace_nll(x, loc, ls, reduction)


def bernoulli_nll(
    x: Tensor, logits: Tensor, *, reduction: str = "none", check_targets: bool = False, backend: str | None = None
) -> Tensor:
    """-log Bernoulli(x; sigmoid(logits)) per sample, x in [0, 1] (checked when check_targets=True)."""
    _pair("x", x, "logits", logits)
    check_reduction(reduction)
    if check_targets and bool(((x < 0) | (x > 1)).any()):
        raise ValueError("x must lie in [0, 1] for the Bernoulli likelihood")
    resolve(backend, x.device)
    return reference.bernoulli_nll(x, logits, reduction)


def latent_nll(z: Tensor, mu: Tensor, logvar: Tensor, *, reduction: str = "none", backend: str | None = None) -> Tensor:
    """-log q(z|x) = -log N(z; mu, exp(logvar)) per sample."""
    _pair("z", z, "mu", mu)
    _pair("z", z, "logvar", logvar)
    check_reduction(reduction)
    resolve(backend, z.device)
    return reference.latent_nll(z, mu, logvar, reduction)


def std_normal_nll(z: Tensor, *, reduction: str = "none", backend: str | None = None) -> Tensor:
    """-log N(z; 0, I) per sample."""
    check_float("z", z)
    check_batched("z", z)
    check_reduction(reduction)
    resolve(backend, z.device)
    return reference.std_normal_nll(z, reduction)


def kl_normal(
    mu: Tensor,
    logvar: Tensor,
    mu2: Tensor | None = None,
    logvar2: Tensor | None = None,
    *,
    reduction: str = "none",
    backend: str | None = None,
) -> Tensor:
    """KL(N(mu, e^logvar) || N(0, I)), or || N(mu2, e^logvar2) when both are given, per sample."""
    _pair("mu", mu, "logvar", logvar)
    if (mu2 is None) != (logvar2 is None):
        raise ValueError("give both mu2 and logvar2, or neither")
    if mu2 is not None:
        _pair("mu", mu, "mu2", mu2)
        _pair("mu", mu, "logvar2", logvar2)
    check_reduction(reduction)
    resolve(backend, mu.device)
    return reference.kl_normal(mu, logvar, mu2, logvar2, reduction)


def vamp_prior_nll(
    z: Tensor, mu_k: Tensor, logvar_k: Tensor, *, reduction: str = "none", backend: str | None = None
) -> Tensor:
    """-log p(z) under the VampPrior 1/K sum_k N(z; mu_k, exp(logvar_k)); z [B, D], mu_k/logvar_k [K, D]."""
    for name, t in (("z", z), ("mu_k", mu_k), ("logvar_k", logvar_k)):
        check_float(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-d, got shape {tuple(t.shape)}")
    check_same_shape("mu_k", mu_k, "logvar_k", logvar_k)
    if mu_k.shape[1] != z.shape[1]:
        raise ValueError(f"mu_k must be [K, D] with D = {z.shape[1]} (the code size of z), got {tuple(mu_k.shape)}")
    if mu_k.shape[0] == 0 or z.shape[0] == 0:
        raise ValueError("z and mu_k must be non-empty")
    check_same_device(z=z, mu_k=mu_k, logvar_k=logvar_k)
    check_reduction(reduction)
    resolve(backend, z.device)
    return reference.vamp_prior_nll(z, mu_k, logvar_k, reduction)


def wake_loss(
    x: Tensor,
    x_mean: Tensor,
    log_scale: Tensor | float | None,
    z: Tensor,
    *,
    likelihood: str = "gaussian",
    prior: str | tuple[Tensor, Tensor] = "normal",
    reduction: str = "none",
    backend: str | None = None,
) -> Tensor:
    """Wake-phase loss per sample: -log p(x|z) - log p(z) (prior "normal" or (mu_k, logvar_k))."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if isinstance(prior, str) and prior != "normal":
        raise ValueError(f"prior must be 'normal' or a (mu_k, logvar_k) pair, got {prior!r}")
    check_reduction(reduction)
    if likelihood == "gaussian":
        rec = gaussian_nll(x, x_mean, log_scale, backend=backend)
    elif likelihood == "laplace":
        rec = laplace_nll(x, x_mean, log_scale, backend=backend)
    else:
        rec = bernoulli_nll(x, x_mean, backend=backend)
    if z.shape[0] != x.shape[0]:
        raise ValueError(f"z must have the batch size of x ({x.shape[0]}), got {tuple(z.shape)}")
    pri = std_normal_nll(z, backend=backend) if isinstance(prior, str) else vamp_prior_nll(z, *prior, backend=backend)
    return reduce(rec + pri, reduction)


def sleep_loss(
    z: Tensor, mu: Tensor, logvar: Tensor, critic_scores: Tensor, *, reduction: str = "none", backend: str | None = None
) -> Tensor:
    """Sleep-phase loss per sample: -log q(z|x~) - f(x~)."""
    check_float("critic_scores", critic_scores)
    if critic_scores.numel() != z.shape[0]:
        raise ValueError(f"critic_scores must hold one score per sample ({z.shape[0]}), got {tuple(critic_scores.shape)}")
    nll = latent_nll(z, mu, logvar, backend=backend)
    return reduce(nll - critic_scores.reshape(-1).to(nll.dtype), reduction)


__all__ = [
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
