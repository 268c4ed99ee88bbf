"""The layers that read and write 3-channel images as im2col + one matmul (`--image-layers matmul`).

With 3 input channels cuDNN pads to 8 and runs a generic kernel: on an H200 those convolutions
(forward, backward and the penalty's double backward) took 3.5 of the 13.4 ms of an iteration at
batch 256. unfold and fold are each other's backward, so these are the same sums, differentiable
to any order, with no convolution in any direction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def image_conv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """conv2d(x, weight, bias, stride=2, padding=1) with inputs in one dtype. Output: channels_last
    strides when x has them."""
    b, _, h, w = x.shape
    out_channels, _, k, _ = weight.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    cols = F.unfold(x, k, padding=1, stride=2)  # [B, C*k*k, L]
    out = cols.transpose(1, 2) @ weight.reshape(out_channels, -1).t()  # [B, L, O]: a row per output pixel
    if bias is not None:
        out = out + bias
    out = out.view(b, (h + 2 - k) // 2 + 1, (w + 2 - k) // 2 + 1, out_channels).permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


def image_conv_transpose(h: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """conv_transpose2d(h, weight, bias, stride=2, padding=1) as one matmul + col2im (fold): its
    backward to h is then unfold + matmul. weight: [C_in, C_out, k, k]."""
    b, c, height, width = h.shape
    k = weight.shape[2]
    rows = h.permute(0, 2, 3, 1).reshape(b, height * width, c)  # a view when channels_last
    cols = rows @ weight.reshape(c, -1)  # [B, L, C_out*k*k]
    out = F.fold(cols.transpose(1, 2), (2 * (height - 1) - 2 + k, 2 * (width - 1) - 2 + k), k, padding=1, stride=2)
    return out if bias is None else out + bias.view(1, -1, 1, 1)

