"""Benchmark cases of the likelihood family: image terms, code terms, the VampPrior, wake and sleep.

Sizes (quick=False): B = 64, 256, 1024 images of 3x64x64 and codes of D=100, the VampPrior with
K=500 components, and B=16384 images (large) for the image terms and the wake loss. quick=True
uses tiny sizes so that every implementation runs in seconds on the CPU (Triton interpreted).
Implementations: "ehm:<backend>" for each compiled backend this machine runs, "eager" (the
plain-PyTorch reference) and "compile" (torch.compile of the reference; left out on the CPU).
"""

from __future__ import annotations

from typing import Callable

import torch

from ehm_fast import _backend, reference
from ehm_fast import losses as L

from .harness import Case

FAMILY = "likelihood"
CODE = 100
K = 500


def _backends(device: torch.device) -> list[str]:
    names = []
    if device.type == "cuda" and _backend.cuda_built():
        names.append("cuda")
    if device.type == "cpu" and _backend.cpu_built():
        names.append("cpu")
    if _backend.triton_available(device.type):
        names.append("triton")
    return names


def _runner(loss: Callable[[], torch.Tensor], grads_of: list[torch.Tensor]) -> Callable[[bool], None]:
    def run(backward: bool) -> None:
        out = loss()
        if backward:
            torch.autograd.grad(out, grads_of)

    return run


def _case(name: str, bytes_fwd: int, bytes_fwdbwd: int, device: torch.device,
          ours: Callable[[str], torch.Tensor], ref: Callable[[], torch.Tensor], grads_of: list[torch.Tensor]) -> Case:
    case = Case(FAMILY, name, bytes_fwd, bytes_fwdbwd)
    for b in _backends(device):
        case.impls[f"ehm:{b}"] = _runner(lambda b=b: ours(b), grads_of)
    case.impls["eager"] = _runner(ref, grads_of)
    if device.type == "cuda":
        compiled = torch.compile(ref)
        case.impls["compile"] = _runner(compiled, grads_of)
    return case


def _image_cases(batch: int, shape: tuple[int, ...], device: torch.device, large: bool = False) -> list[Case]:
    """The three image likelihoods and the wake loss; `large` keeps only gaussian_nll and the wake loss."""
    x = torch.rand(batch, *shape, device=device)
    mean = torch.randn(batch, *shape, device=device, requires_grad=True)
    ls = torch.zeros(shape[0], 1, 1, device=device, requires_grad=True)
    n = x.numel() * x.element_size()
    # forward reads x and mean; backward reads them again and writes grad_mean
    fwd, fwdbwd = 2 * n, 5 * n
    size = f"B={batch} {'x'.join(map(str, shape))}"
    cases = [
        _case(f"gaussian_nll {size}", fwd, fwdbwd, device,
              lambda b: L.gaussian_nll(x, mean, ls, reduction="sum", backend=b),
              lambda: reference.gaussian_nll(x, mean, ls, "sum"), [mean, ls]),
        _case(f"laplace_nll {size}", fwd, fwdbwd, device,
              lambda b: L.laplace_nll(x, mean, ls, reduction="sum", backend=b),
              lambda: reference.laplace_nll(x, mean, ls, "sum"), [mean, ls]),
        _case(f"bernoulli_nll {size}", fwd, fwdbwd, device,
              lambda b: L.bernoulli_nll(x, mean, reduction="sum", backend=b),
              lambda: reference.bernoulli_nll(x, mean, "sum"), [mean]),
    ]
    if large:
        cases = cases[:1]
    z = torch.randn(batch, CODE, device=device, requires_grad=True)
    zb = z.numel() * z.element_size()
    cases.append(_case(f"wake_loss gaussian+normal {size} D={CODE}", fwd + zb, fwdbwd + 3 * zb, device,
                       lambda b: L.wake_loss(x, mean, ls, z, reduction="sum", backend=b),
                       lambda: reference.wake_loss(x, mean, ls, z, reduction="sum"), [mean, ls, z]))
    return cases


def _code_cases(batch: int, d: int, k: int, device: torch.device) -> list[Case]:
    z, mu, lv = (torch.randn(batch, d, device=device, requires_grad=True) for _ in range(3))
    scores = torch.randn(batch, device=device, requires_grad=True)
    n = z.numel() * z.element_size()
    size = f"B={batch} D={d}"
    cases = [
        _case(f"latent_nll {size}", 3 * n, 9 * n, device,
              lambda b: L.latent_nll(z, mu, lv, reduction="sum", backend=b),
              lambda: reference.latent_nll(z, mu, lv, "sum"), [z, mu, lv]),
        _case(f"std_normal_nll {size}", n, 3 * n, device,
              lambda b: L.std_normal_nll(z, reduction="sum", backend=b),
              lambda: reference.std_normal_nll(z, "sum"), [z]),
        _case(f"kl_normal {size}", 2 * n, 6 * n, device,
              lambda b: L.kl_normal(mu, lv, reduction="sum", backend=b),
              lambda: reference.kl_normal(mu, lv, reduction="sum"), [mu, lv]),
        _case(f"sleep_loss {size}", 3 * n, 9 * n, device,
              lambda b: L.sleep_loss(z, mu, lv, scores, reduction="sum", backend=b),
              lambda: reference.sleep_loss(z, mu, lv, scores, "sum"), [z, mu, lv, scores]),
    ]
    mu_k = torch.randn(k, d, device=device, requires_grad=True)
    lv_k = (0.1 * torch.randn(k, d, device=device)).requires_grad_()
    nk = mu_k.numel() * mu_k.element_size()
    # reads z, mu_k, logvar_k once forward; backward reads them again and writes their gradients
    cases.append(_case(f"vamp_prior_nll {size} K={k}", n + 2 * nk, 3 * n + 6 * nk, device,
                       lambda b: L.vamp_prior_nll(z, mu_k, lv_k, reduction="sum", backend=b),
                       lambda: reference.vamp_prior_nll(z, mu_k, lv_k, "sum"), [z, mu_k, lv_k]))
    return cases


def _wake_vamp_case(batch: int, shape: tuple[int, ...], d: int, k: int, device: torch.device) -> Case:
    x = torch.rand(batch, *shape, device=device)
    mean = torch.randn(batch, *shape, device=device, requires_grad=True)
    ls = torch.zeros(shape[0], 1, 1, device=device, requires_grad=True)
    z = torch.randn(batch, d, device=device, requires_grad=True)
    mu_k = torch.randn(k, d, device=device, requires_grad=True)
    lv_k = (0.1 * torch.randn(k, d, device=device)).requires_grad_()
    n, zb, nk = x.numel() * x.element_size(), z.numel() * z.element_size(), mu_k.numel() * mu_k.element_size()
    prior = (mu_k, lv_k)
    return _case(f"wake_loss gaussian+vamp B={batch} {'x'.join(map(str, shape))} D={d} K={k}",
                 2 * n + zb + 2 * nk, 5 * n + 3 * zb + 6 * nk, device,
                 lambda b: L.wake_loss(x, mean, ls, z, prior=prior, reduction="sum", backend=b),
                 lambda: reference.wake_loss(x, mean, ls, z, prior=prior, reduction="sum"), [mean, ls, z, mu_k, lv_k])


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return (_image_cases(4, (3, 8, 8), device) + _code_cases(8, 16, 10, device)
                + [_wake_vamp_case(4, (3, 8, 8), 16, 10, device)])
    out: list[Case] = []
    for batch in (64, 256, 1024):
        out += _image_cases(batch, (3, 64, 64), device)
        out += _code_cases(batch, CODE, K, device)
    out.append(_wake_vamp_case(1024, (3, 64, 64), CODE, K, device))
    out += _image_cases(16384, (3, 64, 64), device, large=True)
    return out
