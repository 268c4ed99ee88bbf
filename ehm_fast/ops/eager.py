"""Calling the custom ops outside torch.compile without the custom-op dispatcher.

The torch.library custom ops are what torch.compile traces. Called eagerly, their dispatcher and
Python autograd wrapper cost tens of microseconds per call, more than a training-size kernel
takes on a GPU: a CUDA graph hides that, but losses called from a user's script, SVRG/STORM and
DDP run eagerly. `eager_op` pairs an op with a torch.autograd.Function that runs the op's own
forward, setup_context and backward functions directly; the backward reads `ctx.eager` to call
its backward kernels directly too, instead of through their custom ops.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.autograd.function import once_differentiable


def eager_op(op: Callable, forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """`op(*inputs)` under torch.compile, the same computation as an autograd.Function otherwise."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *inputs: Any) -> Any:
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            ctx.eager = True
            return output

        @staticmethod
        @once_differentiable  # the backward kernels have no derivative: say so, as the custom ops do
        def backward(ctx: Any, *grads: Any) -> Any:
            return backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = getattr(op, "_name", forward.__name__)  # in autograd graphs and traces

    def call(*inputs: Any) -> Any:
        if torch.compiler.is_compiling():
            return op(*inputs)
        return Eager.apply(*inputs)

    return call


def eager(ctx: Any) -> bool:
    """Whether this backward runs under eager_op's Function (else under the custom op's autograd)."""
    return getattr(ctx, "eager", False)
