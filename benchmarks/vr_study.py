"""Does variance reduction help EHM? Adam, SVRG and STORM trained from the same seeds.

Per optimizer and seed, the trainer's default configuration on the digits (only --optimizer and
--seed differ) is trained in segments; at the end of each segment (a checkpoint) the generator's
stochastic gradient is measured at the fixed weights of that checkpoint over fresh minibatches
(`ehm_fast.optim.gradient_variance`):
  plain   total variance of the minibatch gradient g (every optimizer)
  cv      total variance of the direction v = g - alpha g_ref + const that SVRG / STORM feed their
          base rule, with the checkpoint's own reference point (snapshot or previous step)
  ratio   cv / plain: below 1 when the control variate reduces the variance
After training, the samples are scored as benchmarks/quality_digits.py does (confident fraction
and class entropy of a digit classifier), and the samples of the first seed are drawn side by
side into one picture.

Writes benchmarks/results/vr_study_<device>_<date>.{json,md} and .png (every seed's numbers in
the JSON; the tables generated from them).

    python benchmarks/vr_study.py --seeds 0 1 2 3 --steps 300   # CPU: minutes per run
    python benchmarks/vr_study.py --quick                        # a few steps, writes nothing
    python benchmarks/vr_study.py --data folder:PATH --image-size 64   # 64x64 RGB rows (on a GPU)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from benchmarks.quality_digits import N_SAMPLES, fit_classifier, sample_scores  # noqa: E402
from ehm_fast import checkpoint as ckpt  # noqa: E402
from ehm_fast.config import from_dict  # noqa: E402
from ehm_fast.data import open_data  # noqa: E402
from ehm_fast.ehm import EHM  # noqa: E402
from ehm_fast.optim import STORM, SVRG, gradient_variance  # noqa: E402
from ehm_fast.plots import grid_array, label_rows  # noqa: E402
from ehm_fast.runs import load_models  # noqa: E402
from ehm_fast.train import main as train_main  # noqa: E402

OPTIMIZERS = ("adam", "svrg", "storm")
POOL_BATCHES = 16  # the images the variance measurement draws its minibatches from
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where ehm-train's --device auto trains


def generator_variance(run: Path, num_batches: int, seed: int) -> dict[str, float]:
    """The generator gradient's variance at the checkpoint's weights over `batches` fresh batches."""
    state = ckpt.load(run)
    cfg = from_dict(state["config"])
    models, _ = load_models(run, DEVICE)
    models.train()
    ehm = EHM(models, cfg)
    ehm.load_state_dict(state["ehm"])
    loader = iter(open_data(cfg.data, cfg.image_size, seed=seed, batch_size=cfg.batch_size,
                            channels=state["channels"], flip=cfg.data != "digits"))
    pool = torch.cat([next(loader) for _ in range(POOL_BATCHES)])
    torch.manual_seed(seed)

    def closure() -> torch.Tensor:
        # the batch from the global generator, as the closure's noise: the control variate's replay
        # rewinds it and sees the same batch (a loader's own state would give it another one)
        x = pool[torch.randint(len(pool), (cfg.batch_size,))]
        loss, _ = ehm._generator_closure(ehm._prepare(x))()
        loss.backward()
        return loss.detach()

    params = [p for p in ehm.g_params if p.requires_grad]
    with ehm._trainable(critic=False):
        if isinstance(ehm.opt_g, (SVRG, STORM)):
            v = gradient_variance(closure, params, ehm.opt_g, num_batches=num_batches, modules=[models])
            return {"plain": v.plain, "cv": v.control_variate, "ratio": v.ratio}
        v = gradient_variance(closure, params, [p.detach().clone() for p in params], num_batches=num_batches,
                              modules=[models])
        return {"plain": v.plain, "cv": None, "ratio": None}


def train_segment(run: Path, optimizer: str, seed: int, steps: int, extra: list[str]) -> float:
    """Trains (or resumes) `run` up to `steps` generator steps; returns the seconds it took."""
    args = ["--resume", str(run)] if (run / "checkpoint.pt").exists() else [
        "--optimizer", optimizer, "--seed", str(seed), "--out", str(run), *extra]
    t0 = time.perf_counter()
    code = train_main([*args, "--steps", str(steps), "--ckpt-every", str(steps)])
    if code != 0:
        raise SystemExit(f"training {optimizer} (seed {seed}) failed with exit code {code}")
    return time.perf_counter() - t0


@torch.no_grad()
def samples_of(run: Path, n: int, seed: int) -> torch.Tensor:
    models, _ = load_models(run)
    torch.manual_seed(seed)
    return models.decoder(models.sample_prior(n, torch.device("cpu"))).clamp(-1, 1)


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(rows: list[dict], how: str) -> str:
    """Tables generated from the rows: the variance at each checkpoint (mean over seeds), the
    sample scores (mean over seeds), then every run."""
    optimizers = list(dict.fromkeys(r["optimizer"] for r in rows))
    steps = sorted({c["step"] for r in rows for c in r["checkpoints"]})
    var_rows = []
    for opt in optimizers:
        mine = [r for r in rows if r["optimizer"] == opt]
        for step in steps:
            at = [c for r in mine for c in r["checkpoints"] if c["step"] == step]
            var_rows.append([opt, str(step), _fmt(_mean([c["plain"] for c in at]), ".4g"),
                             _fmt(_mean([c["cv"] for c in at]), ".4g"), _fmt(_mean([c["ratio"] for c in at]), ".3f"),
                             str(len(at))])
    quality = [[opt, _fmt(_mean([r["confident"] for r in rows if r["optimizer"] == opt]), ".3f"),
                _fmt(_mean([r["entropy"] for r in rows if r["optimizer"] == opt]), ".3f"),
                _fmt(_mean([r["train_s"] for r in rows if r["optimizer"] == opt]), ".0f"),
                str(sum(r["optimizer"] == opt for r in rows))] for opt in optimizers]
    runs = [[r["optimizer"], str(r["seed"]), _fmt(r["confident"], ".3f"), _fmt(r["entropy"], ".3f"),
             " / ".join(_fmt(c["ratio"], ".3f") for c in r["checkpoints"]), _fmt(r["train_s"], ".0f")] for r in rows]
    return "\n\n".join([
        f"Runs: {how}.",
        "Generator gradient variance at fixed weights (total over all parameters, across minibatches; mean over "
        "seeds). cv: the direction the optimizer steps along, with its own reference point; ratio = cv / plain.",
        harness.markdown_table(["optimizer", "step", "plain", "cv", "ratio", "seeds"], var_rows),
        f"Sample quality ({N_SAMPLES} samples per run, the classifier of quality_digits.py; mean over seeds):",
        harness.markdown_table(["optimizer", "confident (p >= 0.9)", "class entropy (bits)", "train s", "seeds"],
                               quality),
        "Every run (ratio at each checkpoint):",
        harness.markdown_table(["optimizer", "seed", "confident", "entropy", "ratio per checkpoint", "train s"], runs),
    ])


def side_by_side(grids: dict[str, torch.Tensor], path: Path) -> Path:
    """One picture: each optimizer's samples as a labelled band, one above the other."""
    from PIL import Image

    bands = []
    for name, images in grids.items():
        grid = grid_array(images, nrow=len(images))
        bands.append(label_rows(grid, images.shape[-1], [name]))
    width = max(b.shape[1] for b in bands)
    picture = np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1])) + ((0, 0),) * (b.ndim - 2)) for b in bands])
    Image.fromarray(picture).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few steps per run (checks the script runs; writes nothing)")
    p.add_argument("--steps", type=int, default=300, help="generator steps per run (default 300)")
    p.add_argument("--checkpoints", type=int, default=3, help="segments of training, each ending in a measurement")
    p.add_argument("--batches", type=int, default=8, help="minibatches per variance measurement (default 8)")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--work", default="runs/vr_study", help="folder for the training runs")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed to ehm-train for every run")
    args = p.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    if args.quick:
        args.steps, args.checkpoints, args.batches, args.seeds = 2, 1, 2, args.seeds[:1]
        extra += ["--width", "4", "--critic-width", "4", "--z-dim", "4", "--batch-size", "8", "--log-every", "1",
                  "--sample-every", "100", "--n-samples", "4"]
    if args.steps < args.checkpoints or args.checkpoints < 1:
        p.error("--steps must be at least --checkpoints, which must be at least 1")
    digits = "--data" not in extra
    clf = fit_classifier() if digits else None
    rows, grids = [], {}
    for opt in args.optimizers:
        for seed in args.seeds:
            run = Path(args.work) / f"{opt}-seed{seed}"
            shutil.rmtree(run, ignore_errors=True)  # this script's own scratch run
            checkpoints, seconds = [], 0.0
            for k in range(1, args.checkpoints + 1):
                step = args.steps * k // args.checkpoints
                seconds += train_segment(run, opt, seed, step, extra)
                checkpoints.append({"step": step, **generator_variance(run, args.batches, seed + 1000 * k)})
            images = samples_of(run, N_SAMPLES if digits else 64, seed)
            scores = sample_scores(clf, images) if digits else {"confident": None, "entropy": None}
            rows.append({"optimizer": opt, "seed": seed, "checkpoints": checkpoints, **scores, "train_s": seconds,
                         "run": str(run)})
            if seed == args.seeds[0]:
                grids[opt] = images[:16]
    how = f"{args.steps} steps, ehm-train flags: {' '.join(extra) or '(defaults)'}"
    text = report(rows, how)
    print(text)
    if not args.quick:
        json_path, md_path = harness.write_results("vr_study", DEVICE, rows, text)
        png = side_by_side(grids, json_path.with_suffix(".png"))
        md_path.write_text(md_path.read_text() + f"\n![samples of seed {args.seeds[0]}, one band per optimizer]({png.name})\n")
        print(f"written to {json_path}, {md_path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
