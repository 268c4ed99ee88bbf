"""Benchmark cases of the fused control-variate optimizer update (ehm_fast.optim.functional).

One Adam step over DCGAN-like parameter lists (encoder, decoder and critic, about 10M parameters)
and over ten times that (about 100M), for the SVRG direction (alpha = 1: reads g, g_snap, mu_snap)
and for plain Adam (alpha = 0, no control variate), against per-tensor torch ops ("for-loop"),
torch._foreach_* ops ("foreach") and, on the GPU, torch.optim.Adam(fused=True). Bytes count every
tensor read and every tensor written once.
"""

from __future__ import annotations

import os

import torch

from benchmarks.harness import Case
from ehm_fast import _backend
from ehm_fast.optim import functional as F
from ehm_fast.optim import reference

HYPER = dict(step=10, lr=1e-4, beta1=0.5, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)


def dcgan_shapes(width: int = 64, latent: int = 100, channels: int = 3) -> list[tuple[int, ...]]:
    """Weights and biases/BatchNorm affine parameters of a 64x64 DCGAN decoder, encoder and critic."""
    w = [width * 8, width * 4, width * 2, width]
    decoder = [(latent, w[0], 4, 4), (w[0], w[1], 4, 4), (w[1], w[2], 4, 4), (w[2], w[3], 4, 4), (w[3], channels, 4, 4)]
    encoder = [(w[3], channels, 4, 4), (w[2], w[3], 4, 4), (w[1], w[2], 4, 4), (w[0], w[1], 4, 4),
               (2 * latent, w[0], 4, 4)]
    critic = [(w[3], channels, 4, 4), (w[2], w[3], 4, 4), (w[1], w[2], 4, 4), (w[0], w[1], 4, 4), (1, w[0], 4, 4)]
    shapes = []
    for net in (decoder, encoder, critic):
        for weight in net:
            shapes += [weight, (weight[1] if net is decoder else weight[0],)]  # conv weight, then bias / BN
            shapes += [(weight[1] if net is decoder else weight[0],)]
    return shapes


def _tensors(shapes, device, dtype=torch.float32):
    return [torch.randn(s, device=device, dtype=dtype) for s in shapes]


def _foreach_adam(params, grads, ref, anchors, m, v):
    """The same update with torch._foreach_* ops (a few passes over every list)."""
    beta1, beta2, eps, step, lr = HYPER["beta1"], HYPER["beta2"], HYPER["eps"], HYPER["step"], HYPER["lr"]
    if ref is not None:
        d = torch._foreach_sub(grads, ref)
        torch._foreach_add_(d, anchors)
    else:
        d = grads
    torch._foreach_lerp_(m, d, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, d, d, 1 - beta2)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, (1 - beta2 ** step) ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, -lr / (1 - beta1 ** step))


def _ehm_backends(device: torch.device, quick: bool) -> list[str]:
    names = []
    if device.type == "cuda" and _backend.cuda_built():
        names.append("cuda")
    if device.type == "cpu" and _backend.cpu_built():
        names.append("cpu")
    # the Triton interpreter runs on the CPU only at the quick sizes
    if _backend.triton_available(device.type) and (device.type == "cuda" or quick):
        names.append("triton")
    return names


def _case(name: str, shapes, device: torch.device, quick: bool, with_cv: bool) -> Case:
    params, grads, m, v = (_tensors(shapes, device) for _ in range(4))
    for t in v:
        t.abs_()
    ref, anchors = (_tensors(shapes, device), _tensors(shapes, device)) if with_cv else (None, None)
    n = sum(p.numel() for p in params)
    lists = 6 + 3 if with_cv else 4 + 3  # reads (p, g, [g_ref, anchor,] m, v) + writes (p, m, v)
    nbytes = lists * 4 * n
    alpha = 1.0 if with_cv else 0.0
    impls = {}
    # what SVRG/STORM run: step counts and the skip flag read on the device (no host sync)
    counts = [torch.full((), float(HYPER["step"]), device=device) for _ in params]
    found = torch.zeros(1, device=device)
    device_step = {**HYPER, "step": counts}
    for backend in _ehm_backends(device, quick):
        impls[f"ehm:{backend}"] = (lambda backward, b=backend: F.cv_adam_(
            params, grads, ref, anchors, m, v, alpha=alpha, backend=b, **HYPER))
        impls[f"ehm:{backend} device step"] = (lambda backward, b=backend: F.cv_adam_(
            params, grads, ref, anchors, m, v, alpha=alpha, found_inf=found, backend=b, **device_step))
    impls["for-loop"] = lambda backward: reference.cv_adam_(
        params, grads, ref or [], anchors or [], m, v, [], alpha, HYPER["step"], HYPER["lr"], HYPER["beta1"],
        HYPER["beta2"], HYPER["eps"], HYPER["weight_decay"], HYPER["decoupled"], [], None)
    impls["foreach"] = lambda backward: _foreach_adam(params, grads, ref, anchors, m, v)
    if not with_cv and device.type == "cuda":
        leaves = [torch.nn.Parameter(p.clone()) for p in params]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g
        fused = torch.optim.Adam(leaves, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]), eps=HYPER["eps"],
                                 fused=True)
        impls["torch-fused-adam"] = lambda backward: fused.step()
    what = "SVRG direction (alpha=1)" if with_cv else "plain Adam (alpha=0)"
    return Case(family="optim", name=f"{name} {n / 1e6:.2f}M params, {what}", bytes_fwd=nbytes,
                bytes_fwdbwd=nbytes, impls=impls, kind="step")


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        sizes = [("dcgan width 4", dcgan_shapes(width=4, latent=8))]
    else:
        big = dcgan_shapes() * 10
        sizes = [("dcgan", dcgan_shapes()), ("dcgan x10", big)]
    out = []
    for name, shapes in sizes:
        for with_cv in (True, False):
            out.append(_case(name, shapes, device, quick, with_cv))
    return out


if __name__ == "__main__":  # a quick look without the lead's bench_kernels.py
    from benchmarks.harness import median_time_us

    os.environ.setdefault("TRITON_INTERPRET", "1")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for case in cases(dev, quick=dev.type == "cpu"):
        for label, run in case.impls.items():
            us = median_time_us(lambda: run(False), dev, warmup=1, reps=3)
            print(f"{case.name:55s} {label:18s} {us:10.1f} us {case.bytes_fwd / us / 1e3:8.2f} GB/s")
