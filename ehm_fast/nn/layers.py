"""The layer calls the models make, each choosing between ehm_fast.nn's exact speedups and plain
torch.nn.functional by the levers in force (`LayerOptions`); with every lever off they are the
plain calls, which are the reference of the tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import conv as zero_free
from .batch_norm import bn_act
from .bias_act import ACTIVATIONS, bias_act_reference
from .bias_act import bias_act as fused_bias_act
from .image import image_conv, image_conv_transpose
from .options import LEVERS
from .weights import WeightCache

LRELU_SLOPE = 0.2  # DCGAN's


@dataclass
class LayerOptions:
    """What the layers of one set of models run: levers (see options.LEVERS), the kernel backend of
    the fused ops, the image layers' form, the convolutions' kernels (options.CONV_KERNELS: "triton"
    runs them in ehm_fast.nn.conv's chain with ehm_fast.kernels.conv, with or without the conv
    lever), the weight cache (only while the step engine holds it fresh) and the process group of
    synchronised batch norm."""

    levers: frozenset[str] = field(default_factory=lambda: frozenset(LEVERS))
    backend: str | None = None
    image_layers: str = "cudnn"
    conv_kernel: str = "cudnn"
    cache: WeightCache | None = None
    process_group: Any = None

    @contextlib.contextmanager
    def cached(self, cache: WeightCache | None) -> Iterator[None]:
        """Layers read `cache` within the block (None: they cast at each use)."""
        previous, self.cache = self.cache, cache
        try:
            yield
        finally:
            self.cache = previous


def compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def profile_range(name: str) -> contextlib.AbstractContextManager:
    """A named range in torch.profiler traces, free when no profiler runs."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():  # no graph break under compile
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)


def cast(t: Tensor | None, dtype: torch.dtype, opts: LayerOptions) -> Tensor | None:
    """`t` in `dtype`, from the weight cache under the weight_cache lever."""
    if t is None or t.dtype == dtype:
        return t
    if opts.cache is not None and "weight_cache" in opts.levers:
        return opts.cache.cast(t, dtype)
    return t.to(dtype)


def _operands(x: Tensor, weight: Tensor, bias: Tensor | None, opts: LayerOptions):
    dtype = compute_dtype(x)
    return x.to(dtype), cast(weight, dtype, opts), cast(bias, dtype, opts)


def _zero_free(opts: LayerOptions) -> bool:
    """Whether convolutions run through ehm_fast.nn.conv (the conv lever, or its Triton kernels)."""
    return "conv" in opts.levers or opts.conv_kernel != "cudnn"


def _explicit(opts: LayerOptions) -> bool:
    """Whether a convolution casts its operands itself (else autocast casts them at every use)."""
    return "weight_cache" in opts.levers or _zero_free(opts)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, opts: LayerOptions,
           *, image: bool = False) -> Tensor:
    """A convolution of the models; `image`: the layer reads the image (the --image-layers choice)."""
    if image and opts.image_layers == "matmul":
        return image_conv(*_operands(x, weight, bias, opts))
    if not _explicit(opts):
        return F.conv2d(x, weight, bias, stride, padding)
    x, weight, bias = _operands(x, weight, bias, opts)
    if _zero_free(opts):
        return zero_free.conv2d(x, weight, bias, stride, padding, kernel=opts.conv_kernel)
    return F.conv2d(x, weight, bias, stride, padding)


def conv_transpose2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, opts: LayerOptions,
                     *, image: bool = False) -> Tensor:
    """A transposed convolution of the models; `image`: the layer writes the image."""
    if image and opts.image_layers == "matmul":
        return image_conv_transpose(*_operands(x, weight, bias, opts))
    if not _explicit(opts):
        return F.conv_transpose2d(x, weight, bias, stride, padding)
    x, weight, bias = _operands(x, weight, bias, opts)
    if _zero_free(opts):
        return zero_free.conv_transpose2d(x, weight, bias, stride, padding, kernel=opts.conv_kernel)
    return F.conv_transpose2d(x, weight, bias, stride, padding)


def bias_act(x: Tensor, bias: Tensor | None, activation: str, opts: LayerOptions) -> Tensor:
    """act(x + bias) (bias per channel, or None)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if "bias_act" in opts.levers:
        return fused_bias_act(x, bias, activation=activation, slope=LRELU_SLOPE, backend=opts.backend)
    return bias_act_reference(x, bias, activation=activation, slope=LRELU_SLOPE)


def _fused_bn(norm: nn.Module, opts: LayerOptions) -> bool:
    # SyncBatchNorm (the trainer's --sync-bn with the lever off) keeps its own module
    return type(norm) is nn.BatchNorm2d and "bn_act" in opts.levers


def folds_bias(norm: nn.Module | None, opts: LayerOptions) -> bool:
    """Whether the bias of the convolution before `norm` (None: no norm, the output layer) is
    better added by the fused op after it than by the convolution."""
    if norm is None or isinstance(norm, nn.Identity):
        return "bias_act" in opts.levers
    return _fused_bn(norm, opts)


def norm_act(x: Tensor, norm: nn.Module, activation: str, opts: LayerOptions, input_bias: Tensor | None = None,
             segments: int = 1) -> Tensor:
    """act(norm(x + input_bias)): batch norm + activation as one op under the bn_act lever (with the
    preceding layer's bias folded in), else the norm module then `bias_act`. `segments`: x holds
    that many batches of equal size (merged calls); a batch norm normalises each with its own
    statistics, updating its running statistics once per segment, in order."""
    if segments > 1 and isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return torch.cat([norm_act(part, norm, activation, opts, input_bias) for part in x.chunk(segments)])
    if _fused_bn(norm, opts):
        return bn_act(norm, x, activation, LRELU_SLOPE, input_bias, backend=opts.backend,
                      process_group=opts.process_group)
    if isinstance(norm, nn.Identity):
        return bias_act(x, input_bias, activation, opts)
    if input_bias is not None:
        x = x + input_bias.to(x.dtype).view(1, -1, 1, 1)
    return bias_act(norm(x), None, activation, opts)
