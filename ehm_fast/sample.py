"""`ehm-sample`: draw a grid of samples (and reconstructions) from a trained checkpoint.

`--refine langevin` moves the prior's codes by Langevin dynamics on -log p(z) - w f(G(z)) (the
critic as a sampler, ehm_fast.sampling.langevin_latent) before decoding; docs/sampling.md."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from .checkpoint import CheckpointError
from .data import ImageFolder
from .likelihood import vamp_prior_nll
from .plots import save_grid, save_reconstructions
from .cli import OneLineParser
from .runs import load_models
from .sampling import check_langevin_args, langevin_latent

PROG = "ehm-sample"
REFINERS = ("none", "langevin")


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
    p.add_argument("--refine", choices=REFINERS, default="none", help="move the codes before decoding: langevin = "
                   "Langevin dynamics on -log p(z) - w f(G(z)), the critic as a sampler (default: none)")
    p.add_argument("--refine-steps", type=int, metavar="K", help="Langevin steps (default: 50)")
    p.add_argument("--refine-step-size", type=float, metavar="ETA", help="Langevin step size eta in "
                   "z <- z - eta grad E + sqrt(2 eta) xi (default: 0.01)")
    p.add_argument("--refine-critic-weight", type=float, metavar="W", help="weight w of the critic in the energy "
                   "(default: 1)")
    p.add_argument("--refine-compare", action="store_true", help="also write the samples before refinement, each row "
                   "followed by the same samples after it, next to --out with the suffix _refine")
    return p


def refine_settings(args: argparse.Namespace) -> tuple[int, float, float] | None:
    """(steps, step_size, critic_weight) of --refine langevin, None without it; ValueError for bad values."""
    given = [f"--{k.replace('_', '-')}" for k in ("refine_steps", "refine_step_size", "refine_critic_weight",
                                                   "refine_compare") if getattr(args, k) not in (None, False)]
    if args.refine == "none":
        if given:
            raise ValueError(f"{given[0]} needs --refine langevin")
        return None
    steps = 50 if args.refine_steps is None else args.refine_steps
    step_size = 0.01 if args.refine_step_size is None else args.refine_step_size
    weight = 1.0 if args.refine_critic_weight is None else args.refine_critic_weight
    check_langevin_args(steps, step_size, weight)
    return steps, step_size, weight


def refine_codes(models, z: torch.Tensor, steps: int, step_size: float, critic_weight: float) -> torch.Tensor:
    """Langevin-refined codes under the checkpoint's own prior (N(0, I) or its VampPrior)."""
    log_prior = None  # N(0, I)
    if models.prior is not None:
        mu_k, logvar_k = models.prior.components(models.encoder)

        def log_prior(codes: torch.Tensor) -> torch.Tensor:
            return -vamp_prior_nll(codes, mu_k, logvar_k)
    return langevin_latent(models.decoder, models.critic, z, steps, step_size, critic_weight=critic_weight,
                           log_prior=log_prior)


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
        refine = refine_settings(args)
        models, cfg = load_models(args.checkpoint, args.device)
        torch.manual_seed(args.seed)
        nrow = args.nrow or max(1, int(math.sqrt(args.n)))
        z = models.sample_prior(args.n, torch.device(args.device))
        images = models.decoder(z if refine is None else refine_codes(models, z, *refine))
        path = save_grid(images, args.out, nrow)
        what = "samples" if refine is None else f"samples after {refine[0]} Langevin steps of size {refine[1]:g}"
        print(f"{PROG}: {args.n} {what} written to {path}", file=sys.stderr)
        if args.refine_compare:
            cpath = path.with_name(path.stem + "_refine" + path.suffix)
            save_reconstructions(models.decoder(z), images, cpath, nrow=nrow)
            print(f"{PROG}: each row of samples before refinement above the same samples after it written to "
                  f"{cpath}", file=sys.stderr)
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
