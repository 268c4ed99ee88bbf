"""Benchmark cases of the Triton convolution kernels (ehm_fast.kernels.conv): the GPU gate.

Each of the DCGAN networks' 4x4 stride-2 padding-1 layers (64 px, width 64) at batch 256 and 64,
one case per kernel: the encoder's / critic's layers 2-4 forward, input gradient and weight
gradient, and the decoder's transposed layers' forward. (The decoder's backward runs the same
GEMMs as the encoder's: its input gradient is the forward kernel at the encoder layer's shape and
its weight gradient the weight-gradient kernel with x and dy swapped.) Implementations:

- "ehm:triton": the kernel (tile tuned on the first call, outside the timing);
- "eager": the same sum by PyTorch (cuDNN on a GPU): F.conv2d, F.conv_transpose2d, and
  aten.convolution_backward for the gradients;
- "matmul": one cuBLAS matmul of the same M x N x K, the upper bound of an implicit GEMM.

bf16 channels_last on a GPU, fp32 on the CPU (--quick: one tiny layer, for the smoke test).
FLOPs are 2 * N*OH*OW * O * C * k^2 in every direction (the input gradient's phases skip the
inserted zeros); bench_kernels reports TFLOP/s and the fraction of a large bf16 matmul's rate
measured in the same run. Bytes count each operand read once and the result written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.harness import Case, rotating_inputs
from ehm_fast import _backend

K, STRIDE, PAD = 4, 2, 1
# (name, input channels, output channels, input size) of the encoder's layers 2-4 at 64 px
LAYERS = [("layer2", 64, 128, 32), ("layer3", 128, 256, 16), ("layer4", 256, 512, 8)]
QUICK_LAYERS = [("tiny", 16, 16, 4)]


@dataclass
class ConvCase(Case):
    flops: int = 0  # floating-point operations of one call: bench_kernels reports TFLOP/s


def _triton(device: torch.device) -> bool:
    return _backend.triton_available(device.type)


def _kernels():
    from ehm_fast.kernels import conv

    return conv


def _operands(device: torch.device, dtype: torch.dtype, n: int, c: int, o: int, size: int):
    def cl(*shape):  # channels_last activations and weights, as the models hold them
        return torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

    out = (size + 2 * PAD - K) // STRIDE + 1
    return lambda: (cl(n, c, size, size), cl(o, c, K, K) * 0.05, cl(n, o, out, out))


def _matmul(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int):
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    return lambda backward: a @ b


def _cases_of(layer: tuple, batch: int, device: torch.device, dtype: torch.dtype) -> list[Case]:
    name, c, o, size = layer
    out = (size + 2 * PAD - K) // STRIDE + 1
    make = _operands(device, dtype, batch, c, o, size)
    size_x, size_w, size_y = (batch * c * size * size, o * c * K * K, batch * o * out * out)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sets = rotating_inputs(make, (size_x + size_w + size_y) * itemsize)
    flops = 2 * batch * out * out * o * c * K * K
    rows = batch * out * out
    nbytes = (size_x + size_w + size_y) * itemsize  # two operands read, one result written
    shape = f"{name} B={batch} {c}x{size}x{size}->{o}x{out}x{out}"
    kc = _kernels() if _triton(device) else None

    def backward_of(x, w, y, which):  # what autograd runs for conv2d's gradients
        return torch.ops.aten.convolution_backward(y, x, w, None, [STRIDE] * 2, [PAD] * 2, [1, 1], False, [0, 0], 1,
                                                   [which == 0, which == 1, False])[which]

    dgrad = lambda x, w, y: kc.conv_dgrad(y, w, None, STRIDE, PAD, (size, size))
    dgrad_mnk = (batch * size * size, c, o * K * K // 4)  # the four phases as one GEMM
    # (case name, triton call, torch call, the matmul's (M, N, K)); the decoder's transposed layer
    # maps y [B, o, out, out] to [B, c, size, size]: the input gradient's GEMM, called as
    # F.conv_transpose2d (cuDNN may pick another algorithm for it)
    directions = [
        (f"encoder {shape} forward", lambda x, w, y: kc.conv_fwd(x, w, None, STRIDE, PAD),
         lambda x, w, y: F.conv2d(x, w, None, STRIDE, PAD), (rows, o, c * K * K)),
        (f"encoder {shape} input grad", dgrad, lambda x, w, y: backward_of(x, w, y, 0), dgrad_mnk),
        (f"encoder {shape} weight grad", lambda x, w, y: kc.conv_wgrad(y, x, w, STRIDE, PAD),
         lambda x, w, y: backward_of(x, w, y, 1), (o, c * K * K, rows)),
        (f"decoder {name} B={batch} {o}x{out}x{out}->{c}x{size}x{size} transposed forward", dgrad,
         lambda x, w, y: F.conv_transpose2d(y, w, None, STRIDE, PAD), dgrad_mnk),
    ]
    cases = []
    for case_name, ours, theirs, mnk in directions:
        impls = {}
        if kc is not None:
            impls["ehm:triton"] = lambda backward, f=ours: f(*next(sets))
        impls["eager"] = lambda backward, f=theirs: f(*next(sets))
        impls["matmul"] = _matmul(device, dtype, *mnk)
        cases.append(ConvCase(family="conv", name=case_name, bytes_fwd=nbytes, bytes_fwdbwd=nbytes, impls=impls,
                              kind="step", flops=flops))
    return cases


def matmul_peak_tflops(device: torch.device, quick: bool) -> float:
    """The dense rate of a large matmul measured now (bf16 8192^3 on a GPU): the peak to quote
    convolution TFLOP/s against."""
    from benchmarks.harness import median_time_us

    n = 8192 if device.type == "cuda" else (256 if quick else 1024)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    us = median_time_us(lambda: a @ b, device)
    return 2 * n**3 / (us * 1e-6) / 1e12


def cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers, batches = (QUICK_LAYERS, [1]) if quick else (LAYERS, [256, 64])
    return [case for batch in batches for layer in layers for case in _cases_of(layer, batch, device, dtype)]
