"""The critic as a sampler on the embedded digits: sample scores before and after Langevin refinement.

For each of several seeds, a digits checkpoint (trained here with the trainer's defaults and
--steps, or given with --checkpoint) draws 1,000 codes z ~ p(z); each is decoded as is and after K
Langevin steps on -log p(z) - w f(G(z)) (ehm_fast.sampling.langevin_latent), for a few K. The
classifier scores of benchmarks/quality_digits.py judge the images:
  confident  fraction of samples classified with probability >= 0.9 (recognisable digits)
  entropy    entropy of the predicted-class histogram in bits (3.32: all ten digits equally)
Writes benchmarks/results/refine_digits_<device>_<date>.{json,md}.

    python benchmarks/refine_digits.py                       # 4 seeds, short trainings (a few CPU minutes)
    python benchmarks/refine_digits.py --checkpoint runs/a runs/b --refine-steps 0 20 100
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import markdown_table, write_results  # noqa: E402
from benchmarks.quality_digits import N_SAMPLES, fit_classifier, sample_scores  # noqa: E402
from ehm_fast.runs import load_models  # noqa: E402
from ehm_fast.sample import refine_codes  # noqa: E402
from ehm_fast.train import main as train_main  # noqa: E402


def trained_checkpoints(work: Path, seeds: list[int], steps: int, flags: list[str]) -> list[Path]:
    """One digits run per seed, trained from scratch into work/seed<S> with the trainer's defaults
    plus `flags`; returns the run folders."""
    runs = []
    for seed in seeds:
        out = work / f"seed{seed}"
        shutil.rmtree(out, ignore_errors=True)  # this script's own scratch run
        code = train_main(["--seed", str(seed), "--steps", str(steps), "--out", str(out), "--sample-every",
                           str(max(steps, 1)), "--log-every", str(max(steps // 10, 1)), *flags])
        if code != 0:
            raise SystemExit(f"training seed {seed} ({' '.join(flags)}) failed with exit code {code}")
        runs.append(out)
    return runs


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+", metavar="RUN", help="score these runs (one per seed) instead of training")
    p.add_argument("--seeds", type=int, default=4, help="seeds (trained runs, and the sampling seeds; default 4)")
    p.add_argument("--steps", type=int, default=100, help="generator steps of each training run (default 100)")
    p.add_argument("--refine-steps", type=int, nargs="+", default=[0, 10, 50], help="K values (0: no refinement)")
    p.add_argument("--step-size", type=float, default=0.01, help="Langevin step size eta (default 0.01)")
    p.add_argument("--critic-weight", type=float, default=1.0, help="weight w of the critic in the energy (default 1)")
    p.add_argument("--n", type=int, default=N_SAMPLES, help=f"samples per run (default {N_SAMPLES})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="runs/refine_digits", help="folder for the training runs")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed to ehm-train")
    args = p.parse_args(argv)
    flags = [a for a in args.extra if a != "--"]
    device = torch.device(args.device)
    seeds = list(range(args.seeds))
    runs = [Path(c) for c in args.checkpoint] if args.checkpoint else trained_checkpoints(
        Path(args.work), seeds, args.steps, flags)
    clf = fit_classifier()
    rows = []
    for seed, run in zip(seeds, runs):
        models, _ = load_models(run, device)
        torch.manual_seed(seed)
        with torch.no_grad():
            z = models.sample_prior(args.n, device)
        for k in args.refine_steps:
            t0 = time.perf_counter()
            codes = z if k == 0 else refine_codes(models, z, k, args.step_size, args.critic_weight)
            with torch.no_grad():
                images = models.decoder(codes)
                critic = models.critic(images).mean().item()
            rows.append({"run": str(run), "seed": seed, "refine_steps": k, "step_size": args.step_size,
                         "critic_weight": args.critic_weight, "mean_critic": critic,
                         "seconds": time.perf_counter() - t0, **sample_scores(clf, images.cpu())})
            print(rows[-1], file=sys.stderr)
    table_rows = []
    for k in args.refine_steps:
        mine = [r for r in rows if r["refine_steps"] == k]
        table_rows.append([str(k), mean_std([r["confident"] for r in mine]), mean_std([r["entropy"] for r in mine]),
                           mean_std([r["mean_critic"] for r in mine]), f"{statistics.mean(r['seconds'] for r in mine):.2f}"])
    source = f"--checkpoint {' '.join(map(str, runs))}" if args.checkpoint else \
        f"trained here: {args.steps} generator steps per seed, trainer defaults {' '.join(flags)}".rstrip()
    table = (f"{len(runs)} runs ({source}); {args.n} samples per run; Langevin step size {args.step_size:g}, critic "
             f"weight {args.critic_weight:g}; mean ± std over runs. K = 0 is the generator alone.\n\n"
             + markdown_table(["K (Langevin steps)", "confident (p >= 0.9)", "class entropy (bits)", "mean f(G(z))",
                               "seconds per run"], table_rows))
    print(table)
    for path in write_results("refine_digits", device, rows, table):
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
