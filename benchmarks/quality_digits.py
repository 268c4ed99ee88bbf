"""Quality on the embedded digits: EHM against WGAN-GP on the same networks, data and budget.

Trains each objective for each seed with the trainer's default configuration (only --objective
and --seed differ), draws 1,000 samples per run and scores them with a digit classifier fitted
on the same 8x8 digits (samples are averaged down from 32x32 to 8x8 first):
  confident  fraction of samples classified with probability >= 0.9 (recognisable digits)
  entropy    entropy of the predicted-class histogram in bits (log2(10) = 3.32: all digits equally)
  rec_mse    wake-phase reconstruction error: mean squared error of decoder(mu(x)) against x, in [-1, 1] units
The real images, taken through the same 32 -> 8 px round trip, give the ceiling of both sample scores.

Writes benchmarks/results/quality_digits_<device>_<date>.{json,md} (benchmarks/harness.py): the
JSON holds every run's numbers, the markdown's tables (mean and per seed, then one row per run)
are generated from them.

    python benchmarks/quality_digits.py --seeds 0 1 2 3   # several minutes per run on a CPU
    python benchmarks/quality_digits.py --quick           # a few steps, to check the script runs (writes nothing)
    python benchmarks/quality_digits.py --evaluate RUN_DIR ...   # score finished runs instead of training
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# harness.RESULTS is read at each use, not imported: a test can point it at a temporary folder
from benchmarks import harness  # noqa: E402
from ehm_fast.data import Digits  # noqa: E402
from ehm_fast.train import load_models, main as train_main  # noqa: E402

N_SAMPLES = 1000
REAL = "real data (ceiling)"
SCORES = (("confident", "confident (p >= 0.9)"), ("entropy", "class entropy (bits, max 3.32)"),
          ("rec_mse", "reconstruction MSE"))


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


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(rows: list[dict]) -> str:
    """One line per model: each score's mean over the seeds, then the per-seed values."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = []
    for model in models:
        runs = [r for r in rows if r["model"] == model]
        cells = [model, str(len(runs))]
        for key, _ in SCORES:
            values = [r[key] for r in runs if r[key] is not None]
            digits = 4 if key == "rec_mse" else 3
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(_fmt(values[0], digits))
            else:
                cells.append(f"{statistics.mean(values):.{digits}f} [{', '.join(_fmt(v, digits) for v in values)}]")
        lines.append(cells)
    header = ["model", "runs", *(f"{title}, mean [per seed]" for _, title in SCORES)]
    return harness.markdown_table(header, lines)


def runs_table(rows: list[dict]) -> str:
    body = [[r["model"], "-" if r["seed"] is None else str(r["seed"]), _fmt(r["confident"], 3), _fmt(r["entropy"], 3),
             _fmt(r["rec_mse"], 4), _fmt(r["train_s"], 0), r["run"] or "-"] for r in rows]
    return harness.markdown_table(["model", "seed", "confident", "entropy", "rec MSE", "train s", "run"], body)


def report(rows: list[dict], how: str) -> str:
    return "\n".join([
        f"{torch.get_num_threads()} CPU threads; {how}; {N_SAMPLES} samples per run; classifier: MLP on 8x8 digits.",
        "", summary_table(rows), "", "Every run:", "", runs_table(rows),
    ])


def _device(extra: list[str]) -> torch.device:
    """The device the trainer ran on: --device among the flags, else its auto choice."""
    if "--device" in extra and extra.index("--device") + 1 < len(extra):
        name = extra[extra.index("--device") + 1]
        if name != "auto":
            return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few steps per run (checks the script runs; writes nothing)")
    p.add_argument("--steps", type=int, default=None, help="generator steps (default: the trainer's default)")
    p.add_argument("--objectives", nargs="+", default=["ehm", "wgan-gp"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one training run per objective and seed")
    p.add_argument("--work", default="runs/quality_digits", help="folder for the training runs")
    p.add_argument("--evaluate", nargs="+", metavar="RUN_DIR", help="score these finished runs instead of training")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed to ehm-train for every run")
    args = p.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    steps = ["--steps", "4", "--log-every", "2", "--sample-every", "4"] if args.quick else (
        ["--steps", str(args.steps)] if args.steps else [])
    clf = fit_classifier()
    chosen = torch.randperm(1797, generator=torch.Generator().manual_seed(0))[:N_SAMPLES]
    rows = [{"model": REAL, "seed": None, **sample_scores(clf, digits_images(32)[chosen]), "rec_mse": None,
             "train_s": None, "run": None}]
    for run in args.evaluate or []:
        cfg = load_models(run)[1]
        rows.append({"model": cfg.objective, "seed": cfg.seed, **evaluate(Path(run), clf, cfg.seed), "train_s": None,
                     "run": str(run)})
    for obj in [] if args.evaluate else args.objectives:
        for seed in args.seeds:
            out = Path(args.work) / f"{obj}-seed{seed}"
            shutil.rmtree(out, ignore_errors=True)  # this script's own scratch run
            t0 = time.perf_counter()
            code = train_main(["--objective", obj, "--out", str(out), "--seed", str(seed), *steps, *extra])
            if code != 0:
                print(f"training {obj} (seed {seed}) failed with exit code {code}", file=sys.stderr)
                return code
            rows.append({"model": obj, "seed": seed, **evaluate(out, clf, seed), "train_s": time.perf_counter() - t0,
                         "run": str(out)})
    how = "finished runs scored" if args.evaluate else f"ehm-train flags: {' '.join(steps + extra) or '(defaults)'}"
    text = report(rows, how)
    print(text)
    if not args.quick:
        paths = harness.write_results("quality_digits", _device(extra), rows, text)
        print("written to " + " and ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
