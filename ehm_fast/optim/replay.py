"""Re-evaluating a closure at other parameter values on the same minibatch with the same noise.

SVRG needs grad l_B(w_snap) and STORM grad l_B(w_{t-1}) on the batch B *and the noise draws*
(z, eps, the gradient penalty's interpolation weights, dropout masks) that produced grad l_B(w).
The helpers here rewind the CPU and CUDA generators to the state captured before the first
evaluation, swap the reference values into the parameters in O(1) (`param.data`, no copy of the
module), keep the modules' buffers (BatchNorm running statistics, num_batches_tracked) as they
were, and afterwards restore the generators so the replay consumes no randomness.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

Closure = Callable[[], Optional[Tensor]]


class RNGState:
    """The states of the CPU generator, of every initialised CUDA device's generator and of any
    extra `generators` the closure draws from."""

    def __init__(self, generators: Iterable[torch.Generator] = ()) -> None:
        self.cpu = torch.get_rng_state()
        cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda_live else None
        self.extra = [(g, g.get_state()) for g in generators]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        for g, state in self.extra:
            g.set_state(state)


@contextlib.contextmanager
def swapped_parameters(params: Sequence[Tensor], values: Sequence[Tensor]) -> Iterator[None]:
    """Inside the block, params[i] holds values[i] (the tensors are swapped in, not copied)."""
    if len(params) != len(values):
        raise ValueError(f"values has {len(values)} tensors, params has {len(params)}")
    for i, (p, v) in enumerate(zip(params, values)):
        if v.shape != p.shape or v.dtype != p.dtype or v.device != p.device:
            raise ValueError(f"values[{i}] must match params[{i}] ({tuple(p.shape)}, {p.dtype}, {p.device}), "
                             f"got ({tuple(v.shape)}, {v.dtype}, {v.device})")
    originals = [p.data for p in params]
    try:
        for p, v in zip(params, values):
            p.data = v
        yield
    finally:
        for p, data in zip(params, originals):
            p.data = data


@contextlib.contextmanager
def preserved_buffers(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every buffer of `modules` (BatchNorm running statistics, ...) is as before after the block."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _run(closure: Closure, params: Sequence[Tensor]) -> tuple[Tensor, list[Optional[Tensor]]]:
    for p in params:
        p.grad = None  # fresh gradients, not accumulated into the previous evaluation's
    with torch.enable_grad():
        loss = closure()
    if loss is None:
        raise RuntimeError("the closure returned no loss: it must compute the loss, call backward() and return it")
    return loss, [p.grad for p in params]


def evaluate(closure: Closure, params: Sequence[Tensor], generators: Optional[Iterable[torch.Generator]] = ()
             ) -> tuple[Tensor, list[Optional[Tensor]], Optional[RNGState]]:
    """Runs the closure once at the current parameters: (loss, gradients, RNG state it started from;
    None with generators=None: no state is read, for closures that draw nothing themselves).
    The gradients stay in params' .grad as usual."""
    rng = None if generators is None else RNGState(generators)
    loss, grads = _run(closure, params)
    return loss, grads, rng


def evaluate_at(closure: Closure, params: Sequence[Tensor], values: Sequence[Tensor], rng: Optional[RNGState],
                modules: Iterable[nn.Module] = (), swap: Optional[Sequence[Tensor]] = None
                ) -> tuple[Tensor, list[Optional[Tensor]]]:
    """Replays the closure with the generators rewound to `rng` (None: not touched) and `values`
    swapped into `swap` (default: params); returns (loss, gradients of params there). params'
    .grad, the generators and the modules' buffers are left as they were before the call."""
    swap = params if swap is None else swap
    kept_grads = [p.grad for p in params]
    after = None if rng is None else RNGState([g for g, _ in rng.extra])
    try:
        with preserved_buffers(list(modules)), swapped_parameters(swap, values):
            if rng is not None:
                rng.restore()
            return _run(closure, params)
    finally:
        if after is not None:
            after.restore()
        for p, g in zip(params, kept_grads):
            p.grad = g
