"""scikit-learn's 1,797 handwritten 8x8 digits as a small real-image set that needs no download."""

from __future__ import annotations

import numpy as np
import torch


class Digits:
    """uint8 [1797, C, S, S]: bright strokes on black, upsampled bilinearly (antialiased) from 8x8
    to S x S; C = 1, or 3 with the gray level repeated so RGB models run on it unchanged."""

    def __init__(self, image_size: int = 64, channels: int = 3) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3 for digits, got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        from sklearn.datasets import load_digits

        small = torch.from_numpy(load_digits().images).float().unsqueeze(1) * (255.0 / 16.0)
        big = torch.nn.functional.interpolate(small, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        self.images = big.round_().clamp_(0, 255).to(torch.uint8).expand(-1, channels, -1, -1).contiguous().numpy()
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"Digits(n={len(self)}, size={self.image_size}, channels={self.channels})"

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[i]

    def gather(self, indices: np.ndarray, out: np.ndarray) -> None:
        np.take(self.images, indices, axis=0, out=out[: len(indices)])
