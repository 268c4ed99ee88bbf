"""The trainer's built-in data sources: `digits` (embedded, offline) and `folder:PATH`.

Other specs (shards:, lsun:) go to `ehm_fast.data.open_data` when that module is installed.
A loader is an infinite iterator of [B, C, S, S] float batches in [-1, 1] on its device, with
`state_dict()` / `load_state_dict()` holding (epoch, position) so a resumed run sees the very
batches an uninterrupted one would. Each epoch is a fresh permutation drawn from (seed, epoch);
with several processes, global batch k is entries [k*B*W, (k+1)*B*W) of it and rank r takes the
r-th B of them: the ranks read disjoint images, and together exactly what one process with batch
B*W reads (so the position is the same whatever the number of processes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


class DataError(ValueError):
    """A data source that cannot be opened or read; the CLI prints it as one line."""


class EpochLoader:
    """Batches of `batch_size` items from `fetch(indices) -> [b, C, S, S]`, shuffled per epoch.

    The last incomplete batch of an epoch is dropped, so every batch has the same shape.
    """

    def __init__(
        self,
        n_items: int,
        fetch: Callable[[Tensor], Tensor],
        batch_size: int,
        *,
        channels: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        per_rank = n_items // world_size
        if per_rank < batch_size:
            raise DataError(
                f"the data has {n_items} images, fewer than one batch of {batch_size} per process "
                f"({world_size} process(es)); lower --batch-size"
            )
        self.n_items, self.fetch, self.batch_size = n_items, fetch, batch_size
        self.channels, self.seed, self.rank, self.world_size = channels, seed, rank, world_size
        self.device = torch.device(device)
        self.batches_per_epoch = per_rank // batch_size
        self.epoch, self.position = 0, 0
        self._order: Tensor | None = None

    def _epoch_order(self) -> Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.n_items, generator=g)
        return self._order

    def __iter__(self) -> "EpochLoader":
        return self

    def __next__(self) -> Tensor:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        start = (self.position * self.world_size + self.rank) * self.batch_size
        idx = self._epoch_order()[start : start + self.batch_size]
        self.position += 1
        return self.fetch(idx).to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def digits_images(image_size: int) -> Tensor:
    """scikit-learn's 1,797 8x8 digits, bilinearly upsampled to image_size, in [-1, 1]: [N, 1, S, S]."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float()[:, None] / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def list_images(path: str | os.PathLike) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data folder {str(root)!r} does not exist or is not a folder")
    try:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as exc:
        raise DataError(f"cannot read data folder {str(root)!r}: {exc.strerror or exc}") from None
    if not files:
        raise DataError(f"data folder {str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: Path, image_size: int, channels: int) -> Tensor:
    """One image, centre-cropped to a square and resized: [C, S, S] in [-1, 1]."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            side = min(w, h)
            im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            im = im.resize((image_size, image_size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.float32)
    except OSError as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from None
    t = torch.from_numpy(arr.copy()) / 127.5 - 1
    return t[None] if channels == 1 else t.permute(2, 0, 1).contiguous()


def open_source(
    spec: str,
    image_size: int,
    batch_size: int,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    channels: int = 3,
) -> Any:
    """A loader for `spec`: digits, folder:PATH, or anything ehm_fast.data.open_data accepts."""
    common = dict(seed=seed, rank=rank, world_size=world_size, device=device)
    if spec == "digits":
        images = digits_images(image_size)
        return EpochLoader(len(images), lambda idx: images[idx], batch_size, channels=1, **common)
    if spec.startswith("folder:"):
        files = list_images(spec[len("folder:") :])
        load_image(files[0], image_size, channels)  # fail now, not mid-run, if the format is unreadable
        return EpochLoader(
            len(files),
            lambda idx: torch.stack([load_image(files[i], image_size, channels) for i in idx.tolist()]),
            batch_size,
            channels=channels,
            **common,
        )
    try:
        from .data import open_data
    except ImportError:
        raise DataError(
            f"unknown data source {spec!r}: use digits or folder:PATH (shards:/lsun: sources need ehm_fast.data)"
        ) from None
    return open_data(spec, image_size, batch_size=batch_size, **common)
