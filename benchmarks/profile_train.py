"""Where the time of one EHM iteration goes: a torch.profiler trace of ehm_fast's step (eager, so
every kernel is visible) and of the plain baseline, split into convolutions, normalisation,
elementwise work, reductions, the optimizer, copies and launch gaps.

On a GPU it also prints the ceiling this sets on issue 8's target: the plain bf16+channels_last
iteration replayed from a CUDA graph (row 2 of bench_train.py) runs the same cuDNN convolution
kernels as the eager trace, so (row 2's time) / (those kernels' device time) is the most any
implementation that keeps cuDNN's convolutions can gain over row 2, with everything else free.

    python benchmarks/profile_train.py --batch 256            # GPU
    python benchmarks/profile_train.py --quick                # CPU smoke run
Writes a Chrome trace per row to benchmarks/results/trace_<row>_<batch>.json (not committed; open
in chrome://tracing or Perfetto) and prints the breakdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_train import _time, ehm_runner, plain_runner  # noqa: E402
from benchmarks.harness import RESULTS, markdown_table  # noqa: E402

CATEGORIES = [  # first match wins; matched against lower-cased op / kernel names
    ("optimizer", ("adam", "multi_tensor", "foreach", "cv_adam", "cv_sgd")),
    # before "convolution": cuDNN's own batch-norm kernels are named cudnn::bn_*
    ("normalisation", ("batch_norm", "layer_norm", "native_norm", "bn_", "welford")),
    ("layout transform", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("convolution", ("conv", "cudnn", "gemm", "xmma", "sm90", "sm80", "cutlass", "matmul", "mm_", "addmm",
                     "winograd", "dgrad", "wgrad", "fprop", "implicit", "splitk", "im2col", "col2im")),
    ("ehm_fast losses", ("ehm_fast", "log_partition", "image_nll", "code_nll", "vamp")),
    ("reduction", ("sum", "mean", "logsumexp", "reduce", "norm")),
    ("copy / cast", ("copy", "to_copy", "cat", "clone", "contiguous", "memcpy", "fill")),
    ("random", ("randn", "rand", "normal", "uniform", "philox")),
]


def categorise(name: str) -> str:
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "elementwise / other"


def breakdown(step, x, device: torch.device, trace: Path, top: int = 0) -> dict[str, float]:
    """Microseconds per category in one iteration (device kernels on a GPU, aten ops' self time on the
    CPU), plus "wall"; prints the `top` kernels by device time with their category."""
    for _ in range(3):
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall_us = 1e6 * (time.perf_counter() - t0)
    prof.export_chrome_trace(str(trace))
    shares: dict[str, float] = {}
    if device.type == "cuda":
        # device kernels only: the leaves of the trace
        kernels: dict[str, float] = {}
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                us = evt.time_range.elapsed_us()
                shares[categorise(evt.name)] = shares.get(categorise(evt.name), 0.0) + us
                kernels[evt.name] = kernels.get(evt.name, 0.0) + us
        for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
            print(f"  {us / 1e3:7.3f} ms  {categorise(name):20s} {name[:110]}")
    else:
        for evt in prof.key_averages():
            if evt.key.startswith("aten::") or "ehm_fast" in evt.key:
                shares[categorise(evt.key)] = shares.get(categorise(evt.key), 0.0) + evt.self_cpu_time_total
    busy = sum(shares.values())
    shares["idle / launch gaps"] = max(wall_us - busy, 0.0)
    shares["wall"] = wall_us
    return shares


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="width 8, batch 4, on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=25, help="list this many kernels by device time (GPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    width, batch = (8, 4) if args.quick else (64, args.batch)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = {
        "plain": lambda: plain_runner(device, batch, width, fast=False),
        "plain bf16+cl": lambda: plain_runner(device, batch, width, fast=True, graph=False),
        "ehm_fast (eager)": lambda: ehm_runner(device, batch, width, cuda_graph=False),
        "ehm_fast matmul image layers (eager)": lambda: ehm_runner(device, batch, width, cuda_graph=False,
                                                                   image_layers="matmul"),
    }
    results = {}
    for name, make in rows.items():
        step, x, _ = make()
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        print(f"{name}, batch {batch}" + (": kernels by device time" if device.type == "cuda" else ""))
        results[name] = breakdown(step, x, device, RESULTS / f"trace_{slug}_{batch}.json", top=args.top)
    categories = [c for c, _ in CATEGORIES] + ["elementwise / other", "idle / launch gaps"]
    body = []
    for c in categories:
        body.append([c] + [f"{r.get(c, 0.0) / 1e3:.2f} ms ({r.get(c, 0.0) / r['wall']:.0%})" for r in results.values()])
    body.append(["wall"] + [f"{r['wall'] / 1e3:.2f} ms" for r in results.values()])
    print(markdown_table(["share of one iteration"] + list(results), body))
    if device.type == "cuda":
        print(ceiling(device, batch, width, results["plain bf16+cl"]))


def ceiling(device: torch.device, batch: int, width: int, eager_fast: dict[str, float]) -> str:
    """Row 2 (graphed) and ehm_fast's default step timed now, against the convolution kernels'
    device time in the eager trace of the same plain bf16+channels_last iteration."""
    times = {}
    for name, make in (("row 2", lambda: plain_runner(device, batch, width, fast=True)),
                       ("ehm_fast", lambda: ehm_runner(device, batch, width)),
                       ("matmul", lambda: ehm_runner(device, batch, width, image_layers="matmul"))):
        run, x, _ = make()
        times[name] = _time(lambda: run(x), device, iters=20) * 1e6
    conv = eager_fast.get("convolution", 0.0)
    return (f"\nrow 2 (plain bf16+cl+graph) {times['row 2'] / 1e3:.2f} ms, ehm_fast default {times['ehm_fast'] / 1e3:.2f}"
            f" ms, with --image-layers matmul {times['matmul'] / 1e3:.2f} ms per iteration; cuDNN convolution kernels "
            f"of row 2: {conv / 1e3:.2f} ms ({conv / times['row 2']:.0%} of row 2).\nCeiling with cuDNN's convolutions "
            f"kept and all else free: {times['row 2'] / conv:.2f}x row 2 (ehm_fast now: "
            f"{times['row 2'] / times['ehm_fast']:.2f}x; with matmul image layers {times['row 2'] / times['matmul']:.2f}x).")


if __name__ == "__main__":
    main()
