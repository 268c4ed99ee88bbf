"""Benchmark cases of the log-partition family: the plain form at large M and the fused Gaussian
form at training scale (M generated 3x64x64 images)."""

from __future__ import annotations

import math

import torch

from benchmarks.harness import Case, rotating_inputs
from ehm_fast import losses, reference


def _implementations(device: torch.device, fn, ref_fn, quick: bool) -> dict[str, object]:
    impls = {}
    backends = ["cuda", "triton"] if device.type == "cuda" else ["cpu"]
    for b in backends:
        impls[f"ehm:{b}"] = lambda *a, b=b: fn(*a, backend=b)
    impls["eager"] = ref_fn
    if device.type == "cuda" or not quick:
        impls["compile"] = torch.compile(ref_fn)
    return impls


def _case(family, name, device, make_inputs, fn, ref_fn, bytes_fwd, bytes_fwdbwd, quick) -> Case:
    sets = rotating_inputs(make_inputs, bytes_fwdbwd)
    case = Case(family, name, bytes_fwd, bytes_fwdbwd)
    for label, impl in _implementations(device, fn, ref_fn, quick).items():

        def run(backward: bool, impl=impl) -> None:
            inputs = next(sets)
            out = impl(*inputs)
            if backward:
                leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
                torch.autograd.grad(out, leaves, torch.ones_like(out))

        case.impls[label] = run
    return case


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    f32 = 4
    plain_sizes = [2**16] if quick else [256, 2**24, 2**26]
    for m in plain_sizes:

        def make(m=m):
            s = torch.randn(1, m, device=device, requires_grad=True)
            p = torch.randn(1, m, device=device, requires_grad=True)
            return s, p

        out.append(
            _case("log_partition", f"plain M={m}", device, make, losses.log_partition, reference.log_partition,
                  2 * m * f32, 6 * m * f32, quick)
        )
    image = (3, 16, 16) if quick else (3, 64, 64)
    d = math.prod(image)
    for m in [64] if quick else [64, 256, 1024]:

        def make(m=m):
            scores = torch.randn(m, device=device, requires_grad=True)
            x = torch.randn(m, *image, device=device, requires_grad=True)
            mean = torch.randn(m, *image, device=device, requires_grad=True)
            log_scale = torch.zeros(image[0], 1, 1, device=device, requires_grad=True)
            return scores, x, mean, log_scale

        def eager(scores, x, mean, log_scale):
            return reference.log_partition(scores + reference.gaussian_nll(x, mean, log_scale))

        out.append(
            _case("log_partition", f"gaussian M={m} {'x'.join(map(str, image))}", device, make,
                  losses.log_partition_gaussian, eager, 2 * m * d * f32, 6 * m * d * f32, quick)
        )
    return out
