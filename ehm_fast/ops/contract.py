"""What every backend of an op agrees on, defined once for Python: the accumulation dtype and the
numbers of the likelihood kinds.

The ops, ehm_fast.optim and the Triton kernels import them from here. The C++/CUDA side has its
own single definition (acc_type_of in csrc/dtype.h, ImageKind and CodeKind in csrc/terms.h);
tests/test_kernel_contract.py checks that the two agree.
"""

import torch

# Image likelihoods -log p(x|z) (csrc/terms.h ImageKind).
GAUSSIAN, LAPLACE, BERNOULLI = 0, 1, 2

# Code terms over the operands (a, b, c, e) (csrc/terms.h CodeKind).
LATENT = 0  # -log N(a; b, exp(c))
STD_NORMAL = 1  # -log N(a; 0, 1)
KL_STD = 2  # KL(N(a, exp(b)) || N(0, 1))
KL_PAIR = 3  # KL(N(a, exp(b)) || N(c, exp(e)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in and keep their per-row statistics and optimizer state in:
    fp64 for fp64 inputs, fp32 for every other (fp32, bf16, fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The layout a kernel reads t in and writes its result in: channels_last for a 4-d tensor
    stored that way (and not also contiguous), else contiguous."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
