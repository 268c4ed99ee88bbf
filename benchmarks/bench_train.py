"""End-to-end EHM iteration benchmark: one critic step with gradient penalty + one wake/sleep
generator step, DCGAN 64x64 (width 64, nz 100), Adam, synthetic batches already on the device.

Rows:
  1. plain     : plain PyTorch as a user writes it (eager, fp32, fused Adam, cudnn.benchmark)
  2. plain+    : the same with bf16 autocast + channels_last + whole-iteration CUDA graph
  3. ehm_fast  : ehm_fast's training step with its defaults
  4. ehm_fast -<feature>: each speed feature turned off in turn, first each layer lever of
     ehm_fast.nn (--layer-levers), then the rest
  5. variants: weight clipping instead of the penalty, and the SVRG / STORM optimizers
  6. ehm_fast +<option>: a speed option not (yet) on by default
Reports images/s, ms per iteration, peak memory and model FLOP utilisation (FLOPs counted with
torch.utils.flop_counter's formulas, divided by the bf16 matmul peak measured in the same run):
"MFU" divides the plain iteration's FLOPs (the common yardstick) by each row's time; "own TFLOP"
and "own MFU" count the row's own eager iteration, which differs where a lever changes the work
(the conv lever runs no convolution on the penalty's zero path). Matmuls and convolutions are
what the formulas count: the fused kernels' elementwise work adds nothing to either.

    python benchmarks/bench_train.py                  # batches 64, 256, 1024 (GPU)
    python benchmarks/bench_train.py --quick          # tiny CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import device_name, markdown_table, write_results  # noqa: E402
from benchmarks.plain_ehm import PlainEHM, capture_cuda_graph  # noqa: E402
from ehm_fast.nn.options import LEVERS  # noqa: E402


def matmul_peak_tflops(device: torch.device) -> float:
    """bf16 dense matmul throughput measured now (the matrix-unit ceiling for MFU)."""
    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _time(lambda: a @ b, device, iters=20 if device.type == "cuda" else 3)
    return 2 * n**3 / seconds / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Seconds per call (mean over iters after warmup)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def count_flops(step: Callable[[torch.Tensor], object], x: torch.Tensor) -> int:
    """FLOPs of one call, from torch.utils.flop_counter's per-op formulas. (FlopCounterMode itself
    cannot run a step whose gradient penalty calls autograd.grad: its module tracker breaks.)"""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Counter.total += formula(*args, **kwargs, out_val=out)
            return out

    with Counter():
        step(x)
    return Counter.total


def plain_runner(device, batch, width, *, fast: bool, gp: bool = True, graph: bool | None = None):
    """Row 1 (fast=False) or row 2 (fast=True: bf16 autocast, channels_last, a CUDA graph of the
    whole iteration unless graph=False). Returns (run, x, eager step)."""
    torch.backends.cudnn.benchmark = True
    model = PlainEHM(device, width=width, amp=fast, channels_last=fast, gp_lambda=10.0 if gp else 0.0)
    x = torch.rand(batch, 3, 64, 64, device=device) * 2 - 1
    if fast:
        x = x.contiguous(memory_format=torch.channels_last)
    if (fast if graph is None else graph) and device.type == "cuda":
        replay, _ = capture_cuda_graph(model.step, x)
        return replay, x, model.step
    return model.step, x, model.step


def ehm_runner(device, batch, width, *, fused_losses: bool = True, fused_optimizer: bool = True,
               cuda_graph: bool | None = None, amp: bool | None = None, channels_last: bool | None = None,
               lipschitz: str = "gp", optimizer: str = "adam", image_layers: str = "cudnn",
               layer_levers: str = "all", conv_kernel: str = "cudnn", compile: bool = False):
    """ehm_fast's training step (ehm_fast.EHM) on the same networks; keyword arguments turn single
    speed features off (None = the trainer's default on this device). Every layer lever is on by
    default, as the trainer has it on a GPU ("auto"), so the rows that switch one off compare with
    row 3 on the CPU too."""
    from ehm_fast.config import EHMConfig
    from ehm_fast.ehm import EHM
    from ehm_fast.models import EHMModels

    torch.backends.cudnn.benchmark = True
    models = EHMModels(image_size=64, channels=3, z_dim=100, width=width, critic_width=width, norm="batch",
                       critic_norm="none").to(device)
    cfg = EHMConfig(objective="ehm", estimator="importance", n_critic=1, lipschitz=lipschitz, optimizer=optimizer,
                    backend="auto" if fused_losses else "torch", amp=amp, channels_last=channels_last,
                    cuda_graph=cuda_graph if device.type == "cuda" else False, image_layers=image_layers,
                    layer_levers=layer_levers, conv_kernel=conv_kernel, compile=compile)
    step = EHM(models, cfg)
    if not fused_optimizer and optimizer == "adam":
        # torch's multi-tensor (foreach) Adam in place of the fused kernel
        for name in ("opt_g", "opt_c"):
            old = getattr(step, name)
            setattr(step, name, torch.optim.Adam(old.param_groups[0]["params"], lr=cfg.lr, betas=cfg.betas,
                                                 foreach=True, capturable=step.cuda_graph))
    x = torch.rand(batch, 3, 64, 64, device=device) * 2 - 1
    return step.step, x, None


def own_flops(kwargs: dict, device: torch.device, batch: int, width: int) -> int:
    """FLOPs of one eager iteration of an ehm_fast row's own step (its graph off), on a fresh copy."""
    run, x, _ = ehm_runner(device, batch, width, **{**kwargs, "cuda_graph": False})
    run(x)  # the first iteration also allocates the optimizer states: count a steady one, as timed
    return count_flops(run, x)


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


def measure(name: str, make: Callable[[], tuple], device: torch.device, batch: int, iters: int,
            peak_tflops: float, flops: int, own: Callable[[], int] | None = None) -> dict:
    """Times one row; `flops` (of one iteration, counted once on the plain eager step) gives MFU,
    `own` (counts the row's own iteration) MFU of the FLOPs this row really does."""
    row = {"row": name, "batch": batch}
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run, x, _ = make()
        seconds = _time(lambda: run(x), device, iters)
        row.update(ms=1e3 * seconds, images_s=batch / seconds, tflop_per_iter=flops / 1e12,
                   mfu=flops / seconds / 1e12 / peak_tflops)
        if device.type == "cuda":  # before the count, whose copy of the models would add to it
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if own is not None:
            try:
                mine = own()
                row.update(tflop_per_iter_own=mine / 1e12, mfu_own=mine / seconds / 1e12 / peak_tflops)
            except Exception as exc:  # the count must not cost the row its time
                row["own_flops_error"] = _error(exc)
    except Exception as exc:  # report and go on: one failing row must not hide the others
        row["error"] = _error(exc)
    print(f"  {name:28s} batch {batch:5d}: " + (row.get("error") or f"{row['images_s']:.0f} img/s"), flush=True)
    return row


LOSS_KEYS = ("critic_loss", "critic_gap", "wake_loss", "sleep_loss", "gen_loss")


def _relative(runs: list[dict], ref: list[dict]) -> dict[str, list[float]]:
    return {k: [abs(a[k] - b[k]) / max(abs(b[k]), 1.0) for a, b in zip(runs, ref)] for k in ref[0]}


def loss_agreement(device: torch.device, batch: int, width: int, iters: int = 3) -> dict:
    """Losses of the first `iters` iterations from the same initial weights, batch and random draws,
    against the reference (every ehm_fast feature off: fp32 eager with TF32 off, reference losses,
    torch's Adam, contiguous, no layer levers). Returns, per comparison and loss, |a - b| / max(|b|, 1)
    at each iteration, for: ehm_fast's defaults (CUDA graph off, whose warm-up advances the random
    stream); ehm_fast in fp32 with its fused losses and optimizer (the kernels' own exactness); the
    same with every layer lever against none (the levers' exactness); and the plain baseline in
    bf16 + channels_last against itself in fp32 (what bf16 alone does: rows 2 vs 1). The fp32
    comparisons run with TF32 off on both sides, so only the features themselves can differ."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    fp32 = {"amp": False, "channels_last": False}

    def ehm_losses(allow_tf32: bool, **features) -> list[dict]:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.manual_seed(0)
        run, x, _ = ehm_runner(device, batch, width, cuda_graph=False, **features)
        torch.manual_seed(1)
        return [{k: float(v) for k, v in run(x).items() if k in LOSS_KEYS} for _ in range(iters)]

    def plain_losses(fast: bool) -> list[dict]:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = fast and tf32[0]
        torch.manual_seed(0)
        _, x, step = plain_runner(device, batch, width, fast=fast, graph=False)
        torch.manual_seed(1)
        return [dict(zip(("critic_loss", "gen_loss"), map(float, step(x)))) for _ in range(iters)]

    try:
        ref = ehm_losses(False, **fp32, fused_losses=False, fused_optimizer=False, layer_levers="none")
        fused = ehm_losses(False, **fp32, layer_levers="none")
        return {
            "defaults": _relative(ehm_losses(tf32[0]), ref),
            "fp32 fused": _relative(fused, ref),
            "fp32 all levers vs none": _relative(ehm_losses(False, **fp32, layer_levers="all"), fused),
            "plain bf16": _relative(plain_losses(True), plain_losses(False)),
        }
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


ROWS: list[tuple[str, str, dict]] = [
    ("1 plain", "plain", {"fast": False}),
    ("2 plain+bf16+cl+graph", "plain", {"fast": True}),
    ("3 ehm_fast", "ehm", {}),
    *((f"4 ehm_fast -{lever}", "ehm", {"layer_levers": f"-{lever}"}) for lever in LEVERS),
    ("4 ehm_fast -all layer levers", "ehm", {"layer_levers": "none"}),
    ("4 ehm_fast -fused losses", "ehm", {"fused_losses": False}),
    # torch's foreach Adam cannot skip a non-finite step on the device (fused Adam's found_inf), so
    # the check syncs with the host and the iteration cannot be one graph: compare with "-cuda graph".
    ("4 ehm_fast -fused optimizer -cuda graph", "ehm", {"fused_optimizer": False, "cuda_graph": False}),
    ("4 ehm_fast -cuda graph", "ehm", {"cuda_graph": False}),
    ("4 ehm_fast -bf16", "ehm", {"amp": False}),
    ("4 ehm_fast -channels_last", "ehm", {"channels_last": False}),
    ("5 ehm_fast weight clipping", "ehm", {"lipschitz": "clip"}),
    # an extra gradient evaluation per step is their inherent cost: targets >= 1/2.2 (SVRG) and
    # >= 1/2 (STORM) of row 3's images/s, printed as "vs row 3"; SVRG's snapshot passes (every
    # snapshot_every = 100 steps) fall outside a 20-iteration window
    ("5 ehm_fast svrg", "ehm", {"optimizer": "svrg"}),
    ("5 ehm_fast storm", "ehm", {"optimizer": "storm"}),
    ("5 ehm_fast svrg -cuda graph", "ehm", {"optimizer": "svrg", "cuda_graph": False}),
    ("5 ehm_fast storm -cuda graph", "ehm", {"optimizer": "storm", "cuda_graph": False}),
    # not yet a default: the 3-channel convolutions as im2col + matmul (same sums), untimed so far
    ("6 ehm_fast +matmul image layers", "ehm", {"image_layers": "matmul"}),
    # not yet in "all": the penalty's gradient by explicit first-order passes, untimed so far
    ("6 ehm_fast +explicit penalty", "ehm", {"layer_levers": "all,explicit_penalty"}),
    ("6 ehm_fast +compile +explicit penalty", "ehm", {"layer_levers": "all,explicit_penalty", "compile": True}),
    ("6 ehm_fast +triton convolutions", "ehm", {"conv_kernel": "triton"}),
]


# rows that switch off what is already off on the CPU (the trainer's defaults there): equal to row 3
# (the "5 ... -cuda graph" rows: to their row 5)
GPU_ONLY_ROWS = ("4 ehm_fast -cuda graph", "4 ehm_fast -bf16", "4 ehm_fast -channels_last",
                 "5 ehm_fast svrg -cuda graph", "5 ehm_fast storm -cuda graph")
VR_TARGETS = {"5 ehm_fast svrg": 1 / 2.2, "5 ehm_fast storm": 1 / 2}  # of row 3's images/s


def row_label(name: str, device: torch.device) -> str:
    """Row 2 has no CUDA graph on the CPU: its label says so."""
    return name.replace("+graph", "") if device.type != "cuda" and name.startswith("2 ") else name


def table(rows: list[dict]) -> str:
    header = ["row", "batch", "images/s", "ms/iter", "peak GiB", "MFU", "own TFLOP", "own MFU", "x plain+"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["row"], str(r["batch"]), "n/a", "", "", "", "", "", r["error"][:50]])
            continue
        if "tflop_per_iter_own" in r:
            own = [f"{r['tflop_per_iter_own']:.3f}", f"{r['mfu_own']:.1%}"]
        else:  # a plain row, or the count failed (its error is in the JSON)
            own = ["count failed" if "own_flops_error" in r else "", ""]
        body.append([r["row"], str(r["batch"]), f"{r['images_s']:.0f}", f"{r['ms']:.2f}",
                     f"{r.get('peak_gib', 0):.2f}", f"{r['mfu']:.1%}", *own,
                     f"{r['x_plus']:.2f}" if "x_plus" in r else ""])
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (default 64, 256, 1024)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="width 8, batch 4, 2 iterations (CPU smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", action="append", help="only rows whose name starts with this (e.g. 1, 3)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    width = 8 if args.quick else 64
    batches = args.batch or ([4] if args.quick else [64, 256, 1024])
    iters = 2 if args.quick else args.iters
    peak = matmul_peak_tflops(device)
    print(f"{device_name(device)}: matmul peak {peak:.2f} TFLOP/s (measured)", flush=True)
    agreement = loss_agreement(device, batches[0], width, iters=2 if args.quick else 3)
    for what, label in (("defaults", "ehm_fast defaults vs all features off"),
                        ("fp32 fused", "ehm_fast fp32 with fused losses + optimizer vs all features off (TF32 off)"),
                        ("fp32 all levers vs none", "ehm_fast fp32 with every layer lever vs none (TF32 off)"),
                        ("plain bf16", "plain bf16+channels_last vs plain fp32 (row 2 vs row 1 arithmetic)")):
        print(f"losses, {label} (batch {batches[0]}, relative difference at iterations 1/2/...): "
              + ", ".join(f"{k} " + "/".join(f"{e:.1e}" for e in v) for k, v in agreement[what].items()), flush=True)
    head = {"matmul_peak_tflops": peak, "loss_agreement": agreement}
    rows = []
    for batch in batches:
        _, x, eager_step = plain_runner(device, batch, width, fast=False)
        flops = count_flops(eager_step, x)
        group = []
        for name, kind, kwargs in ROWS:
            if args.rows and not any(name.startswith(r) for r in args.rows):
                continue
            if device.type != "cuda" and name in GPU_ONLY_ROWS:
                print(f"skipped on the CPU (what it switches off is off there): {name}", flush=True)
                continue
            name = row_label(name, device)
            runner = plain_runner if kind == "plain" else ehm_runner
            make = lambda runner=runner, kwargs=kwargs: runner(device, batch, width, **kwargs)  # noqa: E731
            own = None if kind == "plain" else (lambda kwargs=kwargs: own_flops(kwargs, device, batch, width))
            group.append(measure(name, make, device, batch, iters, peak, flops, own))
        base = next((r.get("images_s") for r in group if r["row"].startswith("2 ")), None)
        default = next((r.get("images_s") for r in group if r["row"] == "3 ehm_fast"), None)
        for r in group:
            if base and "images_s" in r:
                r["x_plus"] = r["images_s"] / base
            if default and "images_s" in r and r["row"] in VR_TARGETS:
                r["vs_row3"], r["vs_row3_target"] = r["images_s"] / default, VR_TARGETS[r["row"]]
                print(f"batch {batch}: {r['row']} at {r['vs_row3']:.2f} of row 3's images/s "
                      f"(target >= {r['vs_row3_target']:.2f})", flush=True)
        rows += group
        if not args.no_save:  # after every batch size, so a run cut short still leaves its results
            write_results("train", device, [head] + rows, table(rows))
    text = table(rows)
    if not args.no_save:
        paths = write_results("train", device, [head] + rows, text)
        print(f"wrote {paths[0]} and {paths[1]}")
    print(f"\n{device_name(device)}, matmul peak {peak:.2f} TFLOP/s\n{text}")


if __name__ == "__main__":
    main()
