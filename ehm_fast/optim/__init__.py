"""Variance-reduced optimizers for the generator's gradient (docs/math.md, "Optimisers").

SVRG and STORM feed a control-variate direction v = (g - alpha g_ref) + alpha anchor to a base
rule (Adam, AdamW or SGD with torch.optim's exact semantics) through one fused multi-tensor
kernel per (device, dtype) bucket (`ehm_fast.optim.functional`). The gradient at the reference
parameters is evaluated on the same minibatch with the same noise by replaying the closure
(`ehm_fast.optim.replay`); `gradient_variance` measures what the control variate buys.
"""

from . import functional, replay
from .replay import RNGState, evaluate, evaluate_at, preserved_buffers, swapped_parameters
from .storm import STORM
from .svrg import SVRG
from .variance import GradientVariance, gradient_variance

__all__ = ["SVRG", "STORM", "functional", "replay", "gradient_variance", "GradientVariance", "RNGState",
           "evaluate", "evaluate_at", "preserved_buffers", "swapped_parameters"]
