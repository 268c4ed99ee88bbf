"""AIS against plain importance sampling on the embedded digits: weights, training quality, cost.

1. Weights: from trained digits checkpoints (one per seed), M codes z ~ p(z), x0 ~ p(x|z) and the
   critic f: the effective sample size 1 / sum w^2 of the self-normalised weights and log Z_hat of
   plain importance sampling (w ∝ exp(f(x0)) / p(x0|z)) and of ehm_fast.sampling.ais_log_partition
   at K = 1, 4, 16 (log_proposal = log p(x|z) at fixed z, MALA step ais_step_size * s^2 as the
   trainer's estimator="ais" uses), with the MALA acceptance rate.
2. Quality: EHM trained with --estimator jensen, importance and ais (--ais-steps K), one run per
   seed, scored by benchmarks/quality_digits.py's classifier (confident fraction, class entropy).
3. Cost: time of one ais_log_partition call per K (and of the plain estimate) at M codes on the
   device of the run (CUDA events on a GPU).
Writes benchmarks/results/ais_study_<device>_<date>.{json,md}.

    python benchmarks/ais_study.py                 # 4 seeds, short trainings (CPU: some minutes)
    python benchmarks/ais_study.py --steps 1000 --device cuda
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import markdown_table, median_time_us, write_results  # noqa: E402
from benchmarks.quality_digits import evaluate, fit_classifier  # noqa: E402
from benchmarks.refine_digits import mean_std, trained_checkpoints  # noqa: E402
from ehm_fast import losses  # noqa: E402
from ehm_fast.config import ESTIMATORS  # noqa: E402
from ehm_fast.likelihood import sample_image  # noqa: E402
from ehm_fast.runs import load_models  # noqa: E402
from ehm_fast.sampling import ais_log_partition  # noqa: E402

AIS_STEPS = (1, 4, 16)


def estimators(models, cfg, m: int, device: torch.device) -> dict[str, callable]:
    """name -> thunk returning (log Z_hat, ESS, acceptance or nan) on fresh draws of M codes."""
    dec = models.decoder
    if cfg.likelihood not in ("gaussian", "laplace"):
        raise SystemExit(f"AIS needs a continuous likelihood; this run uses {cfg.likelihood}")
    nll = losses.gaussian_nll if cfg.likelihood == "gaussian" else losses.laplace_nll
    log_scale = dec.log_scale.detach().float()
    step = cfg.ais_step_size * torch.exp(2 * log_scale).mean()

    def draws():
        with torch.no_grad():
            out = dec.output(models.sample_prior(m, device)).float()
            noise = torch.randn_like(out) if cfg.likelihood == "gaussian" else torch.rand_like(out)
            x0, log_p = sample_image(cfg.likelihood, out, log_scale, noise, to_image=dec.to_image)
            return out, x0, log_p

    def critic(x):
        return models.critic(x).float()

    def plain():
        _, x0, log_p = draws()
        with torch.no_grad():
            scores = critic(x0) - log_p
        return torch.logsumexp(scores, 0).item() - math.log(m), losses.importance_weights(scores)[1].item(), math.nan

    def annealed(k):
        def run():
            out, x0, _ = draws()
            result = ais_log_partition(critic, lambda x: -nll(x, out, log_scale), x0, n_steps=k, step_size=step)
            return result.log_z.item(), result.weights()[1].item(), result.acceptance.mean().item()
        return run

    return {"importance": plain, **{f"ais K={k}": annealed(k) for k in AIS_STEPS}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", nargs="+", metavar="RUN", help="runs for the weights study (one per seed) instead "
                   "of the jensen runs trained here")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, default=60, help="generator steps of each training run (default 60)")
    p.add_argument("--ais-steps", type=int, default=4, help="K of the runs trained with --estimator ais (default 4)")
    p.add_argument("--m", type=int, default=64, help="codes per estimate (the trainer's batch size by default: 64)")
    p.add_argument("--repeats", type=int, default=4, help="estimates per run and estimator (fresh draws each)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="runs/ais_study", help="folder for the training runs")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed to ehm-train")
    args = p.parse_args(argv)
    flags = [a for a in args.extra if a != "--"] + ["--device", args.device]
    device = torch.device(args.device)
    seeds = list(range(args.seeds))

    trained: dict[str, list[Path]] = {}
    for est in ("jensen", "importance", "ais"):
        if est not in ESTIMATORS:
            print(f"ais_study: skipping --estimator {est}: ehm_fast.config.ESTIMATORS lacks it", file=sys.stderr)
            continue
        extra = ["--estimator", est, *(["--ais-steps", str(args.ais_steps)] if est == "ais" else []), *flags]
        trained[est] = trained_checkpoints(Path(args.work) / est, seeds, args.steps, extra)
    runs = [Path(c) for c in args.checkpoint] if args.checkpoint else trained.get("jensen", [])

    weight_rows, cost_rows = [], []
    for seed, run in zip(seeds, runs):
        models, cfg = load_models(run, device)
        models.requires_grad_(False)  # the chains differentiate in x only
        torch.manual_seed(seed)
        for name, thunk in estimators(models, cfg, args.m, device).items():
            for _ in range(args.repeats):
                log_z, ess, acc = thunk()
                weight_rows.append({"run": str(run), "seed": seed, "estimator": name, "m": args.m, "log_z": log_z,
                                    "ess": ess, "acceptance": acc})
            if seed == 0:
                cost_rows.append({"estimator": name, "m": args.m, "us": median_time_us(thunk, device, reps=5)})
    clf = fit_classifier()
    quality_rows = [{"estimator": est, "seed": seed, "run": str(run), **evaluate(run, clf, seed)}
                    for est, est_runs in trained.items() for seed, run in zip(seeds, est_runs)]

    names = list(dict.fromkeys(r["estimator"] for r in weight_rows))
    weights_table = markdown_table(
        ["estimator", f"ESS of {args.m}", "log Z_hat", "MALA acceptance"],
        [[n, mean_std([r["ess"] for r in weight_rows if r["estimator"] == n]),
          mean_std([r["log_z"] for r in weight_rows if r["estimator"] == n]),
          "-" if n == "importance" else mean_std([r["acceptance"] for r in weight_rows if r["estimator"] == n])]
         for n in names])
    quality_table = markdown_table(
        ["estimator", "confident (p >= 0.9)", "class entropy (bits)", "rec MSE"],
        [[est + (f" (K={args.ais_steps})" if est == "ais" else ""),
          *(mean_std([r[key] for r in quality_rows if r["estimator"] == est]) for key in ("confident", "entropy",
                                                                                            "rec_mse"))]
         for est in trained])
    cost_table = markdown_table(["estimator", f"ms per estimate (M = {args.m})"],
                                [[r["estimator"], f"{r['us'] / 1e3:.1f}"] for r in cost_rows])
    skipped = [e for e in ("jensen", "importance", "ais") if e not in trained]
    source = f"--checkpoint {' '.join(map(str, runs))}" if args.checkpoint else "the jensen runs below"
    table = "\n\n".join([
        f"{len(runs)} seeds; training runs of {args.steps} generator steps (trainer defaults {' '.join(flags)}).",
        f"## Importance weights ({source}; {args.repeats} fresh draws per run; mean ± std over runs and draws)",
        weights_table,
        "## Sample quality by critic estimator (mean ± std over seeds)"
        + (f"; skipped (not in ESTIMATORS): {', '.join(skipped)}" if skipped else ""),
        quality_table,
        f"## Cost on {device.type} (median of 5 calls, seed 0's run)",
        cost_table,
    ])
    print(table)
    rows = {"weights": weight_rows, "quality": quality_rows, "cost": cost_rows}
    for path in write_results("ais_study", device, [rows], table):
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
