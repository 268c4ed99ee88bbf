"""FID and KID through torchmetrics, with the Inception weights from a local file.

    ehm-fid --checkpoint RUN_DIR --data shards:DIR [--num-images 10000] [--fid-weights PATH]

Features are extracted once per image (by Inception, or any nn.Module mapping uint8 [B, 3, H, W]
to [B, D]) and handed to torchmetrics' FrechetInceptionDistance and KernelInceptionDistance,
which compute the distances. The real set's features are cached beside the shards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's Inception v3 (FID) weights
INCEPTION_FEATURES = (64, 192, 768, 2048)


def default_weights_path() -> Path:
    """Where torch-fidelity (and so torchmetrics) caches its download: torch hub's checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def inception(feature: int = 2048, weights_path: str | os.PathLike | None = None) -> nn.Module:
    """torchmetrics' Inception v3 feature extractor with weights read from a local file:
    `weights_path`, else $EHM_FID_WEIGHTS, else torch hub's cache (nothing is downloaded)."""
    if feature not in INCEPTION_FEATURES:
        raise ValueError(f"feature must be one of {INCEPTION_FEATURES} for Inception, got {feature}")
    default = default_weights_path()
    path = Path(weights_path or os.environ.get("EHM_FID_WEIGHTS") or default).expanduser()
    if not path.is_file():
        elsewhere = "" if path == default else f", or to {default}"
        raise FileNotFoundError(
            f"Inception weights not found at {path}: copy torch-fidelity's {INCEPTION_FILE} there{elsewhere}, "
            "or pass --fid-weights PATH (or set EHM_FID_WEIGHTS)"
        )
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError("FID with Inception needs torch-fidelity: pip install torch-fidelity")
    try:  # torch-fidelity unpickles the file without weights_only; refuse anything but tensors first
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a plain state dict of Inception weights: {err}") from err
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)], feature_extractor_weights_path=str(path))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images pass through; float images in [-1, 1] are mapped to [0, 255]; one channel
    is repeated to three (feature extractors expect RGB)."""
    if images.dtype != torch.uint8:
        images = images.float().add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


@torch.no_grad()
def extract_features(extractor: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """Features [N, D] (float64, CPU) of every image in `batches`."""
    feats = [extractor(to_uint8(b).to(device)).reshape(len(b), -1).double().cpu() for b in batches]
    if not feats:
        raise ValueError("no images were given")
    return torch.cat(feats)


class _Precomputed(nn.Module):
    """Hands features computed beforehand to a torchmetrics metric as its 'feature extractor'."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def distances(real: torch.Tensor, fake: torch.Tensor, *, kid_subset_size: int = 1000, kid_subsets: int = 100) -> dict:
    """FID and KID (mean, std) between two feature sets [N, D], computed by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be [N, D] with one D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {len(real)} real and {len(fake)} fake")
    dim = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(dim))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    subset = min(kid_subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # its warning about buffering all features: that is the intent
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subsets=kid_subsets, subset_size=subset)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    kid_mean, kid_std = kid.compute()
    return {
        "fid": float(fid.compute()),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "num_real": len(real),
        "num_fake": len(fake),
    }


def _extractor(feature: int | nn.Module, weights_path, device) -> nn.Module:
    module = feature if isinstance(feature, nn.Module) else inception(feature, weights_path)
    return module.to(device).eval()


def compute_fid(
    real_batches: Iterable[torch.Tensor],
    fake_batches: Iterable[torch.Tensor],
    *,
    feature: int | nn.Module = 2048,
    weights_path: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
) -> dict:
    """FID and KID between two sets of image batches (uint8 [0, 255] or float [-1, 1], [B, C, H, W]).

    `feature`: an Inception layer width (64, 192, 768, 2048; weights from `weights_path`) or any
    nn.Module mapping uint8 [B, 3, H, W] to [B, D]. KID averages `kid_subsets` subsets of
    `kid_subset_size` images. Returns {fid, kid_mean, kid_std, num_real, num_fake}."""
    extractor = _extractor(feature, weights_path, device)
    real = extract_features(extractor, real_batches, device)
    fake = extract_features(extractor, fake_batches, device)
    return distances(real, fake, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets)


def feature_tag(feature: int | nn.Module) -> str:
    if isinstance(feature, nn.Module):
        return f"{type(feature).__name__}"
    return f"inception{feature}"


def real_features(
    spec: str,
    image_size: int,
    num_images: int,
    extractor: nn.Module,
    tag: str,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 250,
) -> torch.Tensor:
    """Features of `num_images` real images of `spec` (a fixed random subset, all if fewer), cached
    beside the shards (DIR/fid-cache/) for shards:DIR specs."""
    from .data import parse_spec
    from .data.loader import random_subset

    real = random_subset(spec, image_size, num_images, seed=0)
    kind, path = parse_spec(spec)
    cache = None
    if kind == "shards":
        key = hashlib.sha256((Path(path) / "index.json").read_bytes()).hexdigest()[:12]
        cache = Path(path) / "fid-cache" / f"real-{tag}-{len(real)}-{key}.npy"
        if cache.is_file():
            return torch.from_numpy(np.load(cache, allow_pickle=False))
    feats = extract_features(extractor, real.batches(batch_size), device)
    if cache is not None:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, feats.numpy())
        os.replace(tmp, cache)
    return feats


class FidEvaluator:
    """The in-training hook: built once (extractor + cached real features), then called with a
    sampler `sample(n) -> images [n, C, S, S] in [-1, 1]` every --fid-every steps."""

    def __init__(
        self,
        spec: str,
        image_size: int,
        *,
        num_images: int = 10_000,
        feature: int | nn.Module = 2048,
        weights_path: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 250,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
    ) -> None:
        self.device = device
        self.batch_size = batch_size
        self.kid = {"kid_subset_size": kid_subset_size, "kid_subsets": kid_subsets}
        self.extractor = _extractor(feature, weights_path, device)
        self.real = real_features(spec, image_size, num_images, self.extractor, feature_tag(feature), device=device, batch_size=batch_size)
        self.num_fake = len(self.real)

    @torch.no_grad()
    def __call__(self, sample: Callable[[int], torch.Tensor]) -> dict:
        sizes = [min(self.batch_size, self.num_fake - a) for a in range(0, self.num_fake, self.batch_size)]
        fake = extract_features(self.extractor, (sample(k) for k in sizes), self.device)
        return distances(self.real, fake, **self.kid)


def _load_sampler(checkpoint: str, device: torch.device) -> Callable[[int], torch.Tensor]:
    """sample(n) -> n generated images in [-1, 1] from a checkpoint file or run folder, with z drawn
    from the run's own prior (N(0, I), or its VampPrior)."""
    from .runs import load_models

    models = load_models(checkpoint, device)[0]
    return lambda n: models.decoder(models.sample_prior(n, device))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ehm-fid", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run folder of ehm-train, or its checkpoint.pt")
    p.add_argument("--data", required=True, help="real images: shards:DIR, lsun:PATH, folder:PATH, zip:PATH or digits")
    p.add_argument("--num-images", type=int, default=10_000, help="real and generated images compared (default 10000)")
    p.add_argument("--fid-weights", default=None, help=f"Inception weights file ({INCEPTION_FILE})")
    p.add_argument("--feature", type=int, default=2048, choices=INCEPTION_FEATURES, help="Inception layer width (default 2048)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    try:
        sample = _load_sampler(args.checkpoint, device)
        image_size = sample(1).shape[-1]
        evaluator = FidEvaluator(
            args.data,
            image_size,
            num_images=args.num_images,
            feature=args.feature,
            weights_path=args.fid_weights,
            device=device,
            batch_size=args.batch_size,
        )
        result = evaluator(sample)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"ehm-fid: error: {err}", file=sys.stderr)
        return 2
    print(
        f"FID {result['fid']:.3f}  KID {result['kid_mean']:.5f} +- {result['kid_std']:.5f}  "
        f"({result['num_real']} real, {result['num_fake']} generated, {args.data})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
