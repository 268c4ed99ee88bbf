"""Autograd helpers of the layer ops: which gradients a running backward will use, and layouts.

A torch.autograd.Function sees `needs_input_grad` (which inputs require a gradient), not which of
them the backward in progress asks for: an input gradient taken with autograd.grad would still
compute every weight gradient. autograd's own nodes skip those; these helpers let ours do so too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def trackable(t: Tensor | None) -> Tensor | None:
    """A view of a leaf that needs a gradient: autograd can say whether a backward will run a view's
    node, not a leaf's (under autograd.grad); the view costs no copy."""
    if t is None or torch.compiler.is_compiling() or not (t.requires_grad and t.grad_fn is None and torch.is_grad_enabled()):
        return t  # under torch.compile nothing asks (needed() is off there): reading grad_fn would break the graph
    return t.view_as(t)


def _gradient_node(t: Tensor | None) -> Any:
    if t is None or not t.requires_grad or (t.grad_fn is None and t._is_view()):  # a view made under no_grad
        return None
    return torch.autograd.graph.get_gradient_edge(t).node


def gradient_nodes(*inputs: Tensor | None) -> tuple[Any, ...] | None:
    """The nodes that receive the inputs' gradients (take them in forward, on `trackable` inputs);
    None under torch.compile, which traces no autograd nodes: every required gradient is then taken."""
    if torch.compiler.is_compiling():
        return None
    return tuple(_gradient_node(t) for t in inputs)


def needed(ctx: Any, i: int) -> bool:
    """Whether the running backward uses the gradient of input i (ctx.nodes from gradient_nodes)."""
    if not ctx.needs_input_grad[i]:
        return False
    if ctx.nodes is None or torch.compiler.is_compiling():
        return True
    node = ctx.nodes[i]
    return node is not None and torch._C._will_engine_execute_node(node)
