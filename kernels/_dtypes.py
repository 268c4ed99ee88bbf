"""Triton's names of torch dtypes, and the accumulation dtype of ehm_fast.ops.contract in them."""

import torch
import triton.language as tl

from ehm_fast.ops.contract import acc_dtype

TL_TYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}


def tl_acc(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype kernels accumulate in for inputs of `dtype`."""
    return TL_TYPES[acc_dtype(dtype)]
