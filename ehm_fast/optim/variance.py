"""How much a control variate buys: gradient variance across minibatches at fixed parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._base import ControlVariateOptimizer
from .replay import Closure, evaluate, evaluate_at


@dataclass(frozen=True)
class GradientVariance:
    """Total variance (summed over every parameter element, unbiased across batches) of the plain
    minibatch gradient g and of the control-variate direction v = g - alpha g_ref + const."""

    plain: float
    control_variate: float
    batches: int

    @property
    def ratio(self) -> float:
        """control_variate / plain: below 1 when the control variate reduces the variance."""
        return self.control_variate / self.plain if self.plain > 0 else float("nan")


class _Welford:
    """Running mean and sum of squared deviations per element, in fp64."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, None, None

    def add(self, xs: list[Tensor]) -> None:
        self.n += 1
        if self.mean is None:
            self.mean = [x.double().clone() for x in xs]
            self.m2 = [torch.zeros_like(m) for m in self.mean]
            return
        for x, mean, m2 in zip(xs, self.mean, self.m2):
            delta = x.double() - mean
            mean.add_(delta / self.n)
            m2.addcmul_(delta, x.double() - mean)

    def total_variance(self) -> float:
        return sum(float(m2.sum()) for m2 in self.m2) / (self.n - 1)


@torch.no_grad()
def gradient_variance(closure: Closure, params: Sequence[Tensor],
                      reference: Union[Sequence[Tensor], ControlVariateOptimizer], *, num_batches: int = 8,
                      alpha: Optional[float] = None, modules: Iterable[nn.Module] = (),
                      generators: Iterable[torch.Generator] = ()) -> GradientVariance:
    """Measures, at the current (fixed) parameters, the variance across `num_batches` closure calls
    (each should draw its own minibatch and noise) of the gradient g and of the direction
    v = g - alpha g_ref + const, where g_ref is the gradient on the same batch and noise at the
    reference values (SVRG: the snapshot, alpha = 1; STORM: the previous parameters, alpha = 1 - a).

    `reference` is a list of values, one per parameter, or an SVRG/STORM optimizer (its snapshot
    or previous parameters with its held tensors' reference values, and its alpha; `params` are
    then the optimizer's that have them).
    Parameters, .grad, BatchNorm statistics of `modules` and the RNG after the last batch are as a
    plain run of the closure would leave them.
    """
    held, held_values = [], []
    if isinstance(reference, ControlVariateOptimizer):
        params, values, own_alpha, held, held_values = reference._control_variate_reference()
        alpha = own_alpha if alpha is None else alpha
        if not params:
            raise RuntimeError("the optimizer has no reference parameters yet (no snapshot / no step taken)")
    else:
        values = list(reference)
        params = list(params)
        alpha = 1.0 if alpha is None else alpha
    if not isinstance(num_batches, int) or num_batches < 2:
        raise ValueError(f"num_batches must be an int >= 2, got {num_batches!r}")
    modules = list(modules)
    plain, cv = _Welford(), _Welford()
    kept = [p.grad for p in params]
    try:
        for _ in range(num_batches):
            _, grads, rng = evaluate(closure, params, generators)
            _, ref = evaluate_at(closure, params, values + held_values, rng, modules, swap=params + held)
            if any(g is None for g in grads) or any(r is None for r in ref):
                raise RuntimeError("every parameter must get a gradient from the closure")
            plain.add(grads)
            cv.add([g.double() - alpha * r.double() for g, r in zip(grads, ref)])
    finally:
        for p, g in zip(params, kept):
            p.grad = g
    return GradientVariance(plain.total_variance(), cv.total_variance(), num_batches)

