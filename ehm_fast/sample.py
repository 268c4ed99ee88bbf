"""`ehm-sample`: draw a grid of samples (and reconstructions) from a trained checkpoint."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from .checkpoint import CheckpointError
from .data import ImageFolder
from .plots import save_grid, save_reconstructions
from .cli import OneLineParser
from .runs import load_models

PROG = "ehm-sample"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Draw samples from a trained EHM checkpoint into a PNG grid.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file or run folder")
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--out", default="samples.png", help="output PNG (default: samples.png)")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: about sqrt(n))")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--reconstruct", metavar="DIR", help="also encode and decode the images of DIR (up to --n) into "
                   "a second grid, inputs above reconstructions, next to --out with the suffix _recon")
    return p


def folder_images(path: str, image_size: int, channels: int, n: int) -> torch.Tensor:
    """The first n images of a folder (ehm_fast.data's decoding) as [n, channels, S, S] in [-1, 1];
    one channel is the luma of the RGB image (as Pillow's "L" mode)."""
    images = ImageFolder(path, image_size)
    x = torch.stack([images[i] for i in range(min(n, len(images)))]).float() / 127.5 - 1
    if channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.n < 1:
            raise ValueError(f"--n must be at least 1, got {args.n}")
        models, cfg = load_models(args.checkpoint, args.device)
        torch.manual_seed(args.seed)
        nrow = args.nrow or max(1, int(math.sqrt(args.n)))
        images = models.decoder(models.sample_prior(args.n, torch.device(args.device)))
        path = save_grid(images, args.out, nrow)
        print(f"{PROG}: {args.n} samples written to {path}", file=sys.stderr)
        if args.reconstruct:
            x = folder_images(args.reconstruct, cfg.image_size, models.encoder.channels, args.n).to(args.device)
            recons = models.decoder(models.encoder(x)[0])
            rpath = path.with_name(path.stem + "_recon" + path.suffix)
            save_reconstructions(x, recons, rpath, nrow=min(8, len(x)))
            print(f"{PROG}: {len(x)} reconstructions written to {rpath}", file=sys.stderr)
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
