"""Quality on the embedded digits: EHM against WGAN-GP on the same networks, data and budget.

Trains each objective with the trainer's default configuration (only --objective differs), draws
1,000 samples and scores them with a digit classifier fitted on the same 8x8 digits (samples are
averaged down from 32x32 to 8x8 first):
  confident  fraction of samples classified with probability >= 0.9 (recognisable digits)
  entropy    entropy of the predicted-class histogram in bits (log2(10) = 3.32: all digits equally)
  rec_mse    wake-phase reconstruction error: mean squared error of decoder(mu(x)) against x, in [-1, 1] units
The real images, taken through the same 32 -> 8 px round trip, give the ceiling of both sample scores.

    python benchmarks/quality_digits.py            # default budget (several minutes per objective on a CPU)
    python benchmarks/quality_digits.py --quick    # a few steps, to check the script runs
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ehm_fast.data import Digits  # noqa: E402
from ehm_fast.train import load_models, main as train_main  # noqa: E402

N_SAMPLES = 1000


def fit_classifier():
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    d = load_digits()
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=0)
    clf.fit(d.data / 16.0, d.target)
    return clf


def digits_images(image_size: int) -> torch.Tensor:
    """The training images as the trainer sees them: [1797, 1, S, S] in [-1, 1]."""
    return torch.from_numpy(Digits(image_size, channels=1).images).float() / 127.5 - 1


def to_features(images: torch.Tensor) -> np.ndarray:
    """[N, 1, S, S] in [-1, 1] -> [N, 64] 8x8 pixels in [0, 1], the classifier's input."""
    small = F.adaptive_avg_pool2d(images.float(), 8)
    return ((small.clamp(-1, 1) + 1) / 2).flatten(1).numpy()


def sample_scores(clf, images: torch.Tensor) -> dict[str, float]:
    prob = clf.predict_proba(to_features(images))
    counts = np.bincount(prob.argmax(1), minlength=10) / len(prob)
    entropy = max(0.0, -sum(p * math.log2(p) for p in counts if p > 0))
    return {"confident": float((prob.max(1) >= 0.9).mean()), "entropy": float(entropy)}


@torch.no_grad()
def evaluate(run_dir: Path, clf, seed: int) -> dict[str, float]:
    models, cfg = load_models(run_dir)
    torch.manual_seed(seed)
    samples = models.decoder(models.sample_prior(N_SAMPLES))
    real = digits_images(cfg.image_size)
    mu, _ = models.encoder(real)
    rec = (models.decoder(mu) - real).pow(2).mean().item()
    return {**sample_scores(clf, samples), "rec_mse": rec}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few steps per objective (checks that the script runs)")
    p.add_argument("--steps", type=int, default=None, help="generator steps (default: the trainer's default)")
    p.add_argument("--objectives", nargs="+", default=["ehm", "wgan-gp"])
    p.add_argument("--work", default="runs/quality_digits", help="folder for the training runs")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"), help="folder for the markdown table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--evaluate", nargs="+", metavar="RUN_DIR", help="score these finished runs instead of training")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed to ehm-train for every objective")
    args = p.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    steps = ["--steps", "4", "--log-every", "2", "--sample-every", "4"] if args.quick else (
        ["--steps", str(args.steps)] if args.steps else [])
    clf = fit_classifier()
    real = sample_scores(clf, digits_images(32)[torch.randperm(1797, generator=torch.Generator().manual_seed(0))[:N_SAMPLES]])
    rows = [("real data (ceiling)", real | {"rec_mse": float("nan")}, float("nan"))]
    for run in args.evaluate or []:
        state = load_models(run)[1]
        rows.append((f"{state.objective} ({run})", evaluate(Path(run), clf, args.seed), float("nan")))
    for obj in [] if args.evaluate else args.objectives:
        out = Path(args.work) / obj
        shutil.rmtree(out, ignore_errors=True)  # this script's own scratch run
        t0 = time.perf_counter()
        code = train_main(["--objective", obj, "--out", str(out), "--seed", str(args.seed), *steps, *extra])
        if code != 0:
            print(f"training {obj} failed with exit code {code}", file=sys.stderr)
            return code
        rows.append((obj, evaluate(out, clf, args.seed), time.perf_counter() - t0))
    lines = [
        f"# Quality on the embedded digits ({dt.date.today().isoformat()})",
        "",
        f"CPU: {torch.get_num_threads()} threads; torch {torch.__version__}; flags: {' '.join(steps + extra) or '(trainer defaults)'}; "
        f"{N_SAMPLES} samples per model; classifier: MLP on 8x8 digits.",
        "",
        "| model | confident (p >= 0.9) | class entropy (bits, max 3.32) | rec MSE | train seconds |",
        "|---|---|---|---|---|",
    ]
    for name, s, secs in rows:
        rec = "-" if math.isnan(s["rec_mse"]) else f"{s['rec_mse']:.4f}"
        lines.append(f"| {name} | {s['confident']:.3f} | {s['entropy']:.3f} | {rec} | {'-' if math.isnan(secs) else f'{secs:.0f}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick and not args.evaluate:
        path = Path(args.results) / f"quality_digits_{dt.date.today().isoformat()}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
