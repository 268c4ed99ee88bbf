"""Per-sample likelihood terms of the wake and sleep phases (re-exported by `ehm_fast.losses`).

Each returns -log p per sample, summed over all non-batch dimensions ([B] for reduction="none").
Backend "torch" runs `ehm_fast.reference`; the others run the fused kernels through the custom
ops of `ehm_fast.ops.likelihood` and `ehm_fast.ops.vamp`, which read each input once forward and
once backward, accumulate in fp32 (fp64 for fp64) and write gradients only for the inputs that
need them. Results come back in the promoted dtype of the inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
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
from .ops import likelihood as _lk
from .ops import vamp as _vp
from .ops.contract import BERNOULLI, GAUSSIAN, KL_PAIR, KL_STD, LAPLACE, LATENT, STD_NORMAL, acc_dtype

LIKELIHOODS = ("gaussian", "laplace", "bernoulli")
_IMAGE_KIND = {"gaussian": GAUSSIAN, "laplace": LAPLACE, "bernoulli": BERNOULLI}


def _pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    check_float(name_a, a)
    check_float(name_b, b)
    check_batched(name_a, a)
    check_same_shape(name_a, a, name_b, b)
    check_same_device(**{name_a: a, name_b: b})


def _dtype(*tensors: Tensor | None) -> torch.dtype:
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors if t is not None))


def _impl(backend: str | None, first: Tensor) -> str:
    """The concrete backend; empty inputs (nothing for a kernel to do) take the reference."""
    impl = resolve(backend, first.device)
    return "torch" if first.numel() == 0 else impl


def _rows(dtype: torch.dtype, x: Tensor, *others: Tensor) -> tuple[list[Tensor], tuple[int, ...]]:
    """[B, n] contiguous rows of x and `others` (all of x's shape) in `dtype`, and the order of the
    non-batch dims they follow. When all share one dense layout with the batch outermost (e.g.
    channels_last) the rows follow memory order and are views; otherwise they are copies in the
    logical order."""
    order = tuple(range(1, x.dim()))
    if not x.is_contiguous() and all(o.stride() == x.stride() for o in others):
        memory = tuple(sorted(order, key=lambda i: -x.stride(i)))
        if x.permute(0, *memory).is_contiguous():
            order = memory
    rows = [t.to(dtype).permute(0, *order).reshape(t.shape[0], -1).contiguous() for t in (x, *others)]
    return rows, order


def _check_image(x: Tensor, mean_name: str, mean: Tensor, log_scale: Tensor | float | None, kind: int) -> Tensor | None:
    _pair("x", x, mean_name, mean)
    if kind == BERNOULLI:
        return None
    ls = image_scale(log_scale, x)
    check_same_device(x=x, log_scale=ls)
    return ls


def _image_rows(x: Tensor, mean: Tensor, ls: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    """Rows of x and mean, and log_scale expanded to one image in the same order (a small [d] vector
    in the accumulation dtype; autograd of expand/permute reduces its gradient to ls's shape)."""
    (xr, mr), order = _rows(dtype, x, mean)
    if ls is None:
        return xr, mr, None
    scale = ls.expand(x.shape[1:]).permute(*(i - 1 for i in order)).reshape(-1)
    return xr, mr, scale.to(acc_dtype(dtype)).contiguous()


def _image_nll(kind: int, x: Tensor, mean: Tensor, ls: Tensor | None, reduction: str, impl: str) -> Tensor:
    dtype = _dtype(x, mean)
    xr, mr, scale = _image_rows(x, mean, ls, dtype)
    return reduce(_lk.image_nll(xr, mr, scale, kind, impl), reduction).to(dtype)


def gaussian_nll(
    x: Tensor, mean: Tensor, log_scale: Tensor | float, *, reduction: str = "none", backend: str | None = None
) -> Tensor:
    """-log N(x; mean, exp(log_scale)^2) per sample; log_scale a scalar, [C,1,1] or [C,H,W]."""
    ls = _check_image(x, "mean", mean, log_scale, GAUSSIAN)
    check_reduction(reduction)
    impl = _impl(backend, x)
    if impl == "torch":
        return reference.gaussian_nll(x, mean, ls, reduction)
    return _image_nll(GAUSSIAN, x, mean, ls, reduction, impl)


def laplace_nll(
    x: Tensor, loc: Tensor, log_scale: Tensor | float, *, reduction: str = "none", backend: str | None = None
) -> Tensor:
    """-log Laplace(x; loc, exp(log_scale)) per sample."""
    ls = _check_image(x, "loc", loc, log_scale, LAPLACE)
    check_reduction(reduction)
    impl = _impl(backend, x)
    if impl == "torch":
        return reference.laplace_nll(x, loc, ls, reduction)
    return _image_nll(LAPLACE, x, loc, ls, reduction, impl)


def bernoulli_nll(
    x: Tensor, logits: Tensor, *, reduction: str = "none", check_targets: bool = False, backend: str | None = None
) -> Tensor:
    """-log Bernoulli(x; sigmoid(logits)) per sample, x in [0, 1] (checked when check_targets=True)."""
    _check_image(x, "logits", logits, None, BERNOULLI)
    check_reduction(reduction)
    if check_targets and bool(((x < 0) | (x > 1)).any()):
        raise ValueError("x must lie in [0, 1] for the Bernoulli likelihood")
    impl = _impl(backend, x)
    if impl == "torch":
        return reference.bernoulli_nll(x, logits, reduction)
    return _image_nll(BERNOULLI, x, logits, None, reduction, impl)


def _code_nll(kind: int, operands: tuple[Tensor | None, ...], base: Tensor | None, reduction: str, impl: str) -> Tensor:
    """The code term `kind` over rows of the operands (a, b, c, e), plus base (added per sample)."""
    present = [t for t in operands if t is not None]
    dtype = _dtype(*present, base)
    rows = iter(_rows(dtype, *present)[0])
    a, b, c, e = (None if t is None else next(rows) for t in operands)
    acc_base = None if base is None else base.reshape(-1).to(acc_dtype(dtype))
    return reduce(_lk.code_nll(a, b, c, e, acc_base, kind, impl), reduction)


def latent_nll(z: Tensor, mu: Tensor, logvar: Tensor, *, reduction: str = "none", backend: str | None = None) -> Tensor:
    """-log q(z|x) = -log N(z; mu, exp(logvar)) per sample."""
    _pair("z", z, "mu", mu)
    _pair("z", z, "logvar", logvar)
    check_reduction(reduction)
    impl = _impl(backend, z)
    if impl == "torch":
        return reference.latent_nll(z, mu, logvar, reduction)
    return _code_nll(LATENT, (z, mu, logvar, None), None, reduction, impl)


def _check_codes(z: Tensor) -> None:
    check_float("z", z)
    check_batched("z", z)


def std_normal_nll(z: Tensor, *, reduction: str = "none", backend: str | None = None) -> Tensor:
    """-log N(z; 0, I) per sample."""
    _check_codes(z)
    check_reduction(reduction)
    impl = _impl(backend, z)
    if impl == "torch":
        return reference.std_normal_nll(z, reduction)
    return _code_nll(STD_NORMAL, (z, None, None, None), None, reduction, impl)


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
    impl = _impl(backend, mu)
    if impl == "torch":
        return reference.kl_normal(mu, logvar, mu2, logvar2, reduction)
    kind = KL_STD if mu2 is None else KL_PAIR
    return _code_nll(kind, (mu, logvar, mu2, logvar2), None, reduction, impl)


def _check_vamp(z: Tensor, mu_k: Tensor, logvar_k: Tensor) -> None:
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


def _vamp_rows(z: Tensor, mu_k: Tensor, logvar_k: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t.to(dtype).contiguous() for t in (z, mu_k, logvar_k))


def vamp_prior_nll(
    z: Tensor, mu_k: Tensor, logvar_k: Tensor, *, reduction: str = "none", backend: str | None = None
) -> Tensor:
    """-log p(z) under the VampPrior 1/K sum_k N(z; mu_k, exp(logvar_k)); z [B, D], mu_k/logvar_k [K, D]."""
    _check_vamp(z, mu_k, logvar_k)
    check_reduction(reduction)
    impl = _impl(backend, z)
    if impl == "torch":
        return reference.vamp_prior_nll(z, mu_k, logvar_k, reduction)
    rows = _vamp_rows(z, mu_k, logvar_k, _dtype(z, mu_k, logvar_k))
    return reduce(_vp.vamp_prior(*rows, None, impl)[0], reduction)


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
    """Wake-phase loss per sample: -log p(x|z) - log p(z) (prior "normal" or (mu_k, logvar_k)).

    One fused op: the image kernel's per-sample sums feed the prior's kernel, which adds them.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if isinstance(prior, str):
        if prior != "normal":
            raise ValueError(f"prior must be 'normal' or a (mu_k, logvar_k) pair, got {prior!r}")
        mu_k = logvar_k = None
    elif isinstance(prior, (tuple, list)) and len(prior) == 2:
        mu_k, logvar_k = prior
    else:
        raise ValueError(f"prior must be 'normal' or a (mu_k, logvar_k) pair, got {type(prior).__name__}")
    check_reduction(reduction)
    kind = _IMAGE_KIND[likelihood]
    ls = _check_image(x, "x_mean", x_mean, log_scale, kind)
    _check_codes(z)
    if z.shape[0] != x.shape[0]:
        raise ValueError(f"z must have the batch size of x ({x.shape[0]}), got {tuple(z.shape)}")
    check_same_device(x=x, z=z)
    if mu_k is not None:
        _check_vamp(z, mu_k, logvar_k)
    impl = _impl(backend, x)
    if impl == "torch" or z.numel() == 0:
        return reference.wake_loss(x, x_mean, ls, z, likelihood, prior, reduction)
    dtype = _dtype(x, x_mean, z, mu_k, logvar_k)
    xr, mr, scale = _image_rows(x, x_mean, ls, dtype)
    zr = _rows(dtype, z)[0][0]
    if mu_k is not None:
        zr, mu_k, logvar_k = _vamp_rows(zr, mu_k, logvar_k, dtype)
    return reduce(_lk.wake(xr, mr, scale, kind, zr, mu_k, logvar_k, impl)[0], reduction)


def sleep_loss(
    z: Tensor, mu: Tensor, logvar: Tensor, critic_scores: Tensor, *, reduction: str = "none", backend: str | None = None
) -> Tensor:
    """Sleep-phase loss per sample: -log q(z|x~) - f(x~), one fused op (the scores enter as the
    per-sample base of the latent kernel)."""
    _pair("z", z, "mu", mu)
    _pair("z", z, "logvar", logvar)
    check_float("critic_scores", critic_scores)
    if critic_scores.numel() != z.shape[0]:
        raise ValueError(f"critic_scores must hold one score per sample ({z.shape[0]}), got {tuple(critic_scores.shape)}")
    check_same_device(z=z, critic_scores=critic_scores)
    check_reduction(reduction)
    impl = _impl(backend, z)
    if impl == "torch":
        return reference.sleep_loss(z, mu, logvar, critic_scores, reduction)
    return _code_nll(LATENT, (z, mu, logvar, None), -critic_scores, reduction, impl)


_HALF_OPEN = 0.5 - 2.0**-25  # the largest float32 below 0.5: |u| of a Laplace draw stays under 1/2


def sample_image(
    likelihood: str, out: Tensor, log_scale: Tensor, noise: Tensor | None, *,
    to_image: Callable[[Tensor], Tensor], backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """x~ ~ p(x|z) from the decoder's output `out` and standard `noise` (normal for gaussian,
    uniform(0, 1) otherwise), pathwise in `out` and `log_scale`, as an image in [-1, 1] with
    log p(x~|z) in fp32; `to_image(out)` (the mean image) and None when `noise` is None."""
    out = out.float()
    if noise is None:
        return to_image(out), None
    if likelihood == "bernoulli":
        x01 = (noise < torch.sigmoid(out)).float()
        return x01 * 2 - 1, -bernoulli_nll(x01, out, backend=backend)
    log_scale = log_scale.float()
    if likelihood == "gaussian":
        x = out + torch.exp(log_scale) * noise
        return x, -gaussian_nll(x, out, log_scale, backend=backend)
    # inverse CDF of the Laplace distribution; torch.rand gives exactly 0 once in 2^24 draws (in
    # about one step of six at batch 256, 64x64 RGB), whose quantile is -inf: the open interval
    # keeps it finite
    u = (noise - 0.5).clamp(-_HALF_OPEN, _HALF_OPEN)
    x = out - torch.exp(log_scale) * torch.sign(u) * torch.log1p(-2 * u.abs())
    return x, -laplace_nll(x, out, log_scale, backend=backend)


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
