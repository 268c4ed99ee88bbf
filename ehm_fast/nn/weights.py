"""Weights cast once per optimizer step.

Under autocast every use of an fp32 weight casts it again, and inside a CUDA graph autocast's cast
cache is off, so each replay casts every weight at every use (the critic's are used by four passes
and the double backward). A `WeightCache` holds one bf16 copy of each parameter, refreshed with
one multi-tensor copy when the step engine says the weights changed; the layers read the copy and
send their gradient to the fp32 parameter, which the optimizer keeps as the master weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor


class _CachedCast(torch.autograd.Function):
    """`weight.to(copy.dtype)` whose value is the refreshed copy; differentiable to any order."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, copy: Tensor) -> Tensor:
        ctx.dtype = weight.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.to(ctx.dtype), None


class WeightCache:
    """Copies of `params` in `dtype`, in the parameters' memory formats (make it after the model
    has its final device and format)."""

    def __init__(self, params: Iterable[Tensor], dtype: torch.dtype = torch.bfloat16) -> None:
        self.dtype = dtype
        self._params = list({id(p): p for p in params}.values())
        self._copies = {id(p): torch.empty_like(p, dtype=dtype) for p in self._params}
        self.refresh()

    @torch.no_grad()
    def refresh(self, params: Iterable[Tensor] | None = None) -> None:
        """Copy the current values of `params` (default: all) into their casts: one multi-tensor kernel."""
        params = self._params if params is None else [p for p in params if id(p) in self._copies]
        if params:
            torch._foreach_copy_([self._copies[id(p)] for p in params], params)

    def cast(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """`weight` in `dtype`: the cached copy where there is one, else a plain cast."""
        copy = self._copies.get(id(weight)) if dtype == self.dtype else None
        if copy is None:
            return weight.to(dtype)
        if not weight.requires_grad or not torch.is_grad_enabled():
            return copy
        return _CachedCast.apply(weight, copy)
