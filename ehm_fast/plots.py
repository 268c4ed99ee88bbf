"""Image grids (PNG via Pillow) and the loss plot (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

PAD = 2


def grid_array(images: Tensor, nrow: int) -> np.ndarray:
    """[N, C, S, S] in [-1, 1] -> uint8 [H, W] (C = 1) or [H, W, 3], nrow images per row, 2 px gaps."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    out = torch.zeros(c, PAD + rows * (h + PAD), PAD + nrow * (w + PAD), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = PAD + r * (h + PAD), PAD + col * (w + PAD)
        out[:, top : top + h, left : left + w] = x[i]
    return out[0].numpy() if c == 1 else out.permute(1, 2, 0).numpy()


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    from PIL import Image

    nrow = nrow or max(1, int(math.sqrt(images.shape[0])))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_array(images, nrow)).save(path)
    return path


def save_reconstructions(inputs: Tensor, recons: Tensor, path: str | os.PathLike, nrow: int = 8) -> Path:
    """Rows of `nrow` inputs, each followed by the row of their reconstructions."""
    pairs = []
    for start in range(0, inputs.shape[0], nrow):
        pairs += [inputs[start : start + nrow], recons[start : start + nrow]]
    return save_grid(torch.cat(pairs), path, nrow)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_loss_plot(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """One panel per loss family (critic, generator, reconstruction) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("critic", ["critic_loss", "critic_gap", "gp"]),
        ("generator", ["gen_loss", "wake_loss", "sleep_loss"]),
        ("reconstruction", ["rec_mse"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=key)
        ax.set_title(title)
        ax.set_xlabel("generator step")
        if ax.lines:
            ax.legend(fontsize=8)
        if title == "generator" and any(r.get("wake_loss") for r in records):
            ax.set_yscale("symlog")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
