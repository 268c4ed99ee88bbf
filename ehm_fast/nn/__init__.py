"""ehm_fast's network layers: the exact, cheaper forms of the layers the models compose.

Each op has a plain-PyTorch reference (backend "torch", the oracle of the tests and the CPU path)
and its fast form behind one dispatch point (`ehm_fast._backend.resolve_layer`):

- `conv2d`, `conv_transpose2d` (nn.conv): convolutions whose derivatives of every order are ops
  of (incoming gradient, weight) only, so the gradient penalty's double backward runs no
  convolution on a zero tensor; cuDNN's kernels (PyTorch's own) do the sums;
- `bias_act` (nn.bias_act): bias + activation in one Triton pass, with a mask derivative that is
  exactly nothing rather than a zero tensor;
- `batch_norm_act`, `bn_act` (nn.batch_norm): batch statistics, normalise + affine + activation
  and the backward in Triton kernels (fp32 statistics, running statistics as nn.BatchNorm2d keeps
  them, synchronised over a process group when asked);
- `WeightCache` (nn.weights): bf16 weights cast once per optimizer step;
- `image_conv`, `image_conv_transpose` (nn.image): the 3-channel image layers as im2col + matmul.

`nn.layers` holds the calls the models make, each choosing by the levers in force
(`LayerOptions`, `options.LEVERS`); with every lever off they are the plain torch.nn.functional calls.
"""

from .batch_norm import batch_norm_act, bn_act
from .bias_act import bias_act
from .conv import conv2d, conv_transpose2d
from .image import image_conv, image_conv_transpose
from .layers import LayerOptions
from .options import IMAGE_LAYERS, LEVERS, levers_for, parse_levers
from .weights import WeightCache

__all__ = [
    "IMAGE_LAYERS",
    "LEVERS",
    "LayerOptions",
    "WeightCache",
    "batch_norm_act",
    "bias_act",
    "bn_act",
    "conv2d",
    "conv_transpose2d",
    "image_conv",
    "image_conv_transpose",
    "levers_for",
    "parse_levers",
]
