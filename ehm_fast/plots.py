"""Image grids (PNG via Pillow) and the loss plot (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
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


def _save_png(grid: np.ndarray, path: str | os.PathLike) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    return _save_png(grid_array(images, nrow or max(1, int(math.sqrt(images.shape[0])))), path)


def label_rows(grid: np.ndarray, row_height: int, names: Sequence[str]) -> np.ndarray:
    """`grid` with a margin on the left naming each row of images, `names` taken in turn."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    margin = PAD + max(math.ceil(font.getlength(n)) for n in names) + PAD
    image = Image.fromarray(grid)
    canvas = Image.new(image.mode, (margin + image.width, image.height))
    canvas.paste(image, (margin, 0))
    draw, white = ImageDraw.Draw(canvas), 255 if image.mode == "L" else (255, 255, 255)
    for r in range((image.height - PAD) // (row_height + PAD)):
        middle = PAD + r * (row_height + PAD) + row_height // 2
        draw.text((PAD, middle), names[r % len(names)], fill=white, font=font, anchor="lm")
    return np.asarray(canvas)


def save_reconstructions(inputs: Tensor, recons: Tensor, path: str | os.PathLike, nrow: int = 8,
                         labels: tuple[str, str] | None = None) -> Path:
    """Rows of `nrow` inputs, each followed by the row of their reconstructions; `labels` (e.g.
    ("input", "reconstruction")) name the two kinds of row in a margin on the left."""
    pairs = []
    for start in range(0, inputs.shape[0], nrow):
        pairs += [inputs[start : start + nrow], recons[start : start + nrow]]
    grid = grid_array(torch.cat(pairs), nrow)
    return _save_png(grid if labels is None else label_rows(grid, inputs.shape[-2], labels), path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _symlog_ticks(ax: Any, values: list[float]) -> None:
    """A symlog axis whose linear part spans the decade below the largest value: ticks at 0 and at
    +-10^k from there up, in plain numbers (the default crowds 10^0, 0 and -10^0 together)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, SymmetricalLogLocator

    top = max((abs(v) for v in values), default=1.0) or 1.0
    first, last = max(0, math.floor(math.log10(top)) - 1), math.ceil(math.log10(top))
    linthresh = 10.0**first
    decades = [10.0**k for k in range(first, last + 1)]
    ax.set_yscale("symlog", linthresh=linthresh)
    ax.yaxis.set_major_locator(FixedLocator(sorted([0.0, *decades, *(-d for d in decades)])))
    ax.yaxis.set_minor_locator(SymmetricalLogLocator(base=10, linthresh=linthresh, subs=range(2, 10)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def save_loss_plot(records: list[dict[str, Any]], path: str | os.PathLike, *, critic_weight: float | None = None) -> Path:
    """One panel per loss family (critic, generator, reconstruction) against the step. With
    `critic_weight` (w) the generator panel says why the sleep loss sits near -w f(x~)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("critic", "in units of the critic f", ["critic_loss", "critic_gap", "gp"]),
        ("generator", "loss per image (nats)", ["gen_loss", "wake_loss", "sleep_loss"]),
        ("reconstruction", "squared error per pixel (in [-1, 1])", ["rec_mse"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
    for ax, (title, ylabel, keys) in zip(axes, panels):
        values = []
        for key in keys:
            pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
            if pts:
                ax.plot(*zip(*pts), label=key)
                values += [v for _, v in pts]
        if title == "generator" and critic_weight is not None and any("sleep_loss" in r for r in records):
            # -w f(x~) dominates -log q(z|x~): the sleep loss follows the critic's scale times w.
            title += f"\nsleep $= -\\log q(z|\\tilde x) - w f(\\tilde x)$ with $w$ = {critic_weight:g}: near $-w f$"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("generator step")
        ax.set_ylabel(ylabel)
        if ax.lines:
            ax.legend(fontsize=8)
        if title.startswith("generator") and any(r.get("wake_loss") for r in records):
            _symlog_ticks(ax, values)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
