"""LSUN-format databases made here, for the tests and benchmarks (nothing can be downloaded)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random RGB image (coarse noise upsampled, plus fine grain): compresses and
    decodes more like a photograph than white noise does."""
    coarse = rng.integers(0, 256, size=(max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.integers(-12, 13, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def lsun_key(i: int, salt: str = "") -> bytes:
    """A 40-hex key like LSUN's image ids (a SHA-1), derived from i."""
    return hashlib.sha1(f"{salt}{i}".encode()).hexdigest().encode()


def write_lmdb(path: str | os.PathLike, items: dict[bytes, bytes]) -> Path:
    import lmdb

    path = Path(path)
    env = lmdb.open(str(path), map_size=max(1 << 24, 2 * sum(len(v) + 64 for v in items.values())))
    with env.begin(write=True) as txn:
        for key, value in items.items():
            txn.put(key, value)
    env.close()
    return path


def make_lsun(
    path: str | os.PathLike,
    n: int,
    *,
    seed: int = 0,
    formats: tuple[str, ...] = ("WEBP", "JPEG"),
    corrupt: int = 0,
    short_side: int = 256,
) -> dict[bytes, bytes]:
    """Writes an LSUN-format LMDB of n photo-like images (shorter side `short_side`, aspect ratios
    varying, formats cycling through `formats`) plus `corrupt` undecodable entries; returns the
    items written."""
    rng = np.random.default_rng(seed)
    items = {}
    for i in range(n):
        long_side = int(short_side * rng.uniform(1.0, 1.6))
        w, h = (long_side, short_side) if i % 2 == 0 else (short_side, long_side)
        items[lsun_key(i, str(seed))] = encode(photo_like(rng, w, h), formats[i % len(formats)])
    for i in range(corrupt):
        good = next(iter(items.values())) if items else b""
        # a truncated image and plain garbage, alternately
        items[lsun_key(n + i, f"corrupt{seed}")] = good[: len(good) // 3] if i % 2 == 0 else rng.bytes(500)
    write_lmdb(path, items)
    return items
