"""Where the time of one EHM iteration goes: a torch.profiler trace of ehm_fast's step (eager, so
every kernel is visible) and of the plain baseline, split into convolutions, normalisation,
elementwise work, reductions, the optimizer, copies and launch gaps.

On a GPU it also prints the ceiling this sets on issue 8's target: the plain bf16+channels_last
iteration replayed from a CUDA graph (row 2 of bench_train.py) runs the same cuDNN convolution
kernels as the eager trace, so (row 2's time) / (those kernels' device time) is the most any
implementation that keeps cuDNN's convolutions can gain over row 2, with everything else free.

    python benchmarks/profile_train.py --batch 256            # GPU
    python benchmarks/profile_train.py --quick                # CPU smoke run
Writes benchmarks/results/profile_<device>_<date>.{json,md} (per row: the category breakdown, the
top kernels by device time (aten ops by self time on the CPU) and the time in each profiler range
of the step: its phases and every layer), and a Chrome trace per row to
benchmarks/results/trace_<row>_<batch>.json (not committed; open in chrome://tracing or Perfetto).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# harness.RESULTS is read at each use, not imported: the tests point it at a temporary folder
from benchmarks import harness  # noqa: E402
from benchmarks.bench_train import _time, ehm_runner, plain_runner  # noqa: E402
from benchmarks.harness import markdown_table  # noqa: E402

CATEGORIES = [  # first match wins; matched against lower-cased op / kernel names
    ("optimizer", ("adam", "multi_tensor", "foreach", "cv_adam", "cv_sgd")),
    # before "convolution": cuDNN's own batch-norm kernels are named cudnn::bn_*
    ("normalisation", ("batch_norm", "layer_norm", "native_norm", "bn_", "welford")),
    ("layout transform", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("convolution", ("conv", "cudnn", "gemm", "xmma", "sm90", "sm80", "cutlass", "matmul", "mm_", "addmm",
                     "winograd", "dgrad", "wgrad", "fprop", "implicit", "splitk", "im2col", "col2im", "::mm", "::bmm")),
    ("ehm_fast losses", ("ehm_fast", "log_partition", "image_nll", "code_nll", "vamp")),
    ("random", ("randn", "rand", "normal", "uniform", "philox")),  # before "reduction": "normal" holds "norm"
    ("reduction", ("sum", "mean", "logsumexp", "reduce", "norm")),
    ("copy / cast", ("copy", "to_copy", "cat", "clone", "contiguous", "memcpy", "fill")),
]


# the record_function ranges of the step: ehm_fast.ehm's phases and ehm_fast.models' layers
PHASES = ("critic_step", "generator_step", "critic_loss", "penalty_forward", "penalty_input_gradient", "wake",
          "sleep", "backward", "optimizer")
LAYER_PREFIXES = ("encoder.", "decoder.", "critic.")
PRINTED = 15  # kernels per row on stdout; the results files keep --top of them
EHM_ROW = "ehm_fast (eager)"  # every layer lever on: its top kernels go into the markdown


def categorise(name: str) -> str:
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "elementwise / other"


def is_range(name: str) -> bool:
    return name in PHASES or name.startswith(LAYER_PREFIXES)


def range_times(events, cuda: bool) -> dict[str, dict[str, float]]:
    """Per profiler range: its calls and the microseconds inside it, summed over its calls (device
    time of the kernels launched inside it on a GPU, its CPU time otherwise). On a GPU a kernel
    belongs to every range open while the host op that launched it began, on whichever thread:
    the autograd engine runs a CUDA backward on its own thread, whose ops are no children of the
    "backward" range, so the range events' own device_time_total would leave the backward out."""
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    spans = [e for e in cpu if is_range(e.name)]
    out: dict[str, dict[str, float]] = {}
    for span in spans:
        entry = out.setdefault(span.name, {"calls": 0, "us": 0.0})
        entry["calls"] += 1
        if not cuda:
            entry["us"] += span.time_range.end - span.time_range.start
    if cuda:
        for e in cpu:
            us = sum(k.duration for k in e.kernels)
            if not us:
                continue
            for span in spans:
                if span.time_range.start <= e.time_range.start < span.time_range.end:
                    out[span.name]["us"] += us
    return out


def breakdown(step, x, device: torch.device, trace: Path, top: int) -> dict:
    """One profiled iteration: "categories", microseconds per category (device kernels on a GPU,
    aten ops' self time on the CPU) plus "wall"; "top", the `top` kernels (ops) by that time;
    "ranges", the time per profiler range (`range_times`)."""
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
    kernels: dict[str, float] = {}
    if device.type == "cuda":
        # device kernels only: the leaves of the trace
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                kernels[evt.name] = kernels.get(evt.name, 0.0) + evt.time_range.elapsed_us()
    else:
        for evt in prof.key_averages():
            if evt.key.startswith("aten::") or "ehm_fast" in evt.key:
                kernels[evt.key] = evt.self_cpu_time_total
    shares: dict[str, float] = {}
    for name, us in kernels.items():
        shares[categorise(name)] = shares.get(categorise(name), 0.0) + us
    shares["idle / launch gaps"] = max(wall_us - sum(shares.values()), 0.0)
    shares["wall"] = wall_us
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    for name, us in ranked[:PRINTED]:
        print(f"  {us / 1e3:7.3f} ms  {categorise(name):20s} {name[:110]}")
    return {"categories": shares, "top": [{"name": n, "us": us, "category": categorise(n)} for n, us in ranked],
            "ranges": range_times(prof.events(), device.type == "cuda")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="width 8, batch 4, on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=60, help="keep this many kernels (ops on the CPU) per row")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    width, batch = (8, 4) if args.quick else (64, args.batch)
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    eager = {"cuda_graph": False}
    rows = {
        "plain": lambda: plain_runner(device, batch, width, fast=False),
        "plain bf16+cl": lambda: plain_runner(device, batch, width, fast=True, graph=False),
        EHM_ROW: lambda: ehm_runner(device, batch, width, **eager, layer_levers="all"),
        "ehm_fast no layer levers (eager)": lambda: ehm_runner(device, batch, width, **eager, layer_levers="none"),
        "ehm_fast matmul image layers (eager)": lambda: ehm_runner(device, batch, width, **eager,
                                                                   image_layers="matmul"),
    }
    results = {}
    for name, make in rows.items():
        step, x, _ = make()
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        print(f"{name}, batch {batch}: {'kernels by device time' if device.type == 'cuda' else 'ops by self time'}")
        results[name] = breakdown(step, x, device, harness.RESULTS / f"trace_{slug}_{batch}.json", args.top)
    text = _breakdown_table(results) + "\n\n" + _ranges_table(results, device)
    print(text)
    if device.type == "cuda":
        line = ceiling(device, batch, width, results["plain bf16+cl"]["categories"])
        print(line)
        text += "\n" + line
    text += "\n\n" + _top_table(results[EHM_ROW]["top"])
    paths = harness.write_results("profile", device, [{"row": n, "batch": batch, **r} for n, r in results.items()],
                                  text)
    print(f"wrote {paths[0]} and {paths[1]}")


def _breakdown_table(results: dict) -> str:
    categories = [c for c, _ in CATEGORIES] + ["elementwise / other", "idle / launch gaps"]
    cats = [r["categories"] for r in results.values()]
    body = [[c] + [f"{r.get(c, 0.0) / 1e3:.2f} ms ({r.get(c, 0.0) / r['wall']:.0%})" for r in cats] for c in categories]
    body.append(["wall"] + [f"{r['wall'] / 1e3:.2f} ms" for r in cats])
    return markdown_table(["share of one iteration"] + list(results), body)


def _ranges_table(results: dict, device: torch.device) -> str:
    """Milliseconds per profiler range (x calls), phases first, then the layers in the order they
    first ran, for the rows that have ranges (ehm_fast's)."""
    named = {n: r["ranges"] for n, r in results.items() if r["ranges"]}
    seen = dict.fromkeys(k for r in named.values() for k in r)
    keys = [k for k in PHASES if k in seen] + [k for k in seen if k not in PHASES]
    body = [[k] + [f"{r[k]['us'] / 1e3:.3f} (x{r[k]['calls']})" if k in r else "" for r in named.values()]
            for k in keys]
    unit = "device" if device.type == "cuda" else "CPU"
    return markdown_table([f"range: {unit} ms, inclusive (calls)"] + list(named), body)


def _top_table(top: list[dict]) -> str:
    body = [[f"{t['us'] / 1e3:.3f}", t["category"], t["name"][:100].replace("|", "/")] for t in top]
    return f"Top kernels of {EHM_ROW}:\n\n" + markdown_table(["ms", "category", "kernel / op"], body)


def ceiling(device: torch.device, batch: int, width: int, eager_fast: dict[str, float]) -> str:
    """Row 2 (graphed) and ehm_fast's default step (with and without its layer levers) timed now,
    against the convolution kernels' device time in the eager trace of the same plain
    bf16+channels_last iteration."""
    ms = {}
    for name, make in (("row 2", lambda: plain_runner(device, batch, width, fast=True)),
                       ("ehm_fast", lambda: ehm_runner(device, batch, width)),
                       ("no levers", lambda: ehm_runner(device, batch, width, layer_levers="none")),
                       ("matmul", lambda: ehm_runner(device, batch, width, image_layers="matmul"))):
        run, x, _ = make()
        ms[name] = _time(lambda: run(x), device, iters=20) * 1e3
    conv = eager_fast.get("convolution", 0.0) / 1e3
    row2 = ms["row 2"]
    return (f"\nrow 2 (plain bf16+cl+graph) {row2:.2f} ms, ehm_fast default {ms['ehm_fast']:.2f} ms (without its "
            f"layer levers {ms['no levers']:.2f} ms), with --image-layers matmul {ms['matmul']:.2f} ms per iteration; "
            f"cuDNN convolution kernels of row 2: {conv:.2f} ms ({conv / row2:.0%} of row 2).\n"
            f"Ceiling with cuDNN's convolutions kept and all else free: {row2 / conv:.2f}x row 2 (ehm_fast now: "
            f"{row2 / ms['ehm_fast']:.2f}x, without its layer levers {row2 / ms['no levers']:.2f}x; with matmul image "
            f"layers {row2 / ms['matmul']:.2f}x).")


if __name__ == "__main__":
    main()
