"""Kernel microbenchmarks: every case of every op family, every implementation.

    python benchmarks/bench_kernels.py            # full sizes (meant for a GPU)
    python benchmarks/bench_kernels.py --quick    # tiny sizes, seconds on a CPU
    python benchmarks/bench_kernels.py --family log_partition

For each case: forward, backward (forward+backward minus forward) and forward+backward medians
in microseconds, GB/s of the bytes that must move (each input read once, each output written
once), the fraction of the device-to-device copy bandwidth measured in the same run, and the
speedup against eager PyTorch and torch.compile of the reference. Cases with FLOPs (the conv
family) also get TFLOP/s, from the CUDA-graph time where there is one, and its fraction of a
large bf16 matmul's rate measured in the same run ("% peak", cases_conv.matmul_peak_tflops).
On a GPU also the forward+
backward (or step) replayed from CUDA graphs ("graph us"): the device time without the host's
launch and dispatch costs, which dominate training-size ops in eager mode. Writes JSON and markdown to
benchmarks/results/kernels_<device>_<date>.{json,md} and prints the table last.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Case,
    copy_bandwidth_gbs,
    device_name,
    graph_time_us,
    markdown_table,
    median_time_us,
    write_results,
)


def discover(families: list[str] | None) -> list:
    here = Path(__file__).resolve().parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("cases_"))
    if families:
        names = [n for n in names if n.removeprefix("cases_") in families]
    return [importlib.import_module(f"benchmarks.{n}") for n in names]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(case: Case, device: torch.device, copy_gbs: float, peak_tflops: float | None = None) -> list[dict]:
    rows = []
    for label, run in case.impls.items():
        row = {"family": case.family, "case": case.name, "impl": label}
        try:
            if case.kind == "step":
                row["step_us"] = median_time_us(lambda: run(False), device)
                total_us, nbytes = row["step_us"], case.bytes_fwd
            else:
                row["fwd_us"] = median_time_us(lambda: run(False), device)
                row["fwdbwd_us"] = median_time_us(lambda: run(True), device)
                row["bwd_us"] = max(row["fwdbwd_us"] - row["fwd_us"], 0.0)
                total_us, nbytes = row["fwdbwd_us"], case.bytes_fwdbwd
            _sync(device)
            row["gbs"] = nbytes / (total_us * 1e-6) / 1e9
            row["copy_frac"] = row["gbs"] / copy_gbs
            row["total_us"] = total_us
        except Exception as exc:  # an implementation that cannot run here is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        if device.type == "cuda" and "error" not in row:
            try:  # the same call replayed from CUDA graphs: device time alone
                row["graph_us"] = graph_time_us(lambda: run(case.kind != "step"), device)
                row["graph_copy_frac"] = nbytes / (row["graph_us"] * 1e-6) / 1e9 / copy_gbs
            except Exception as exc:
                row["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        if getattr(case, "flops", 0) and "total_us" in row:  # device time where a graph measured it
            row["tflops"] = case.flops / (row.get("graph_us", row["total_us"]) * 1e-6) / 1e12
            row["peak_frac"] = row["tflops"] / peak_tflops
        rows.append(row)
    for ref in ("eager", "compile", "foreach", "for-loop"):
        base = next((r for r in rows if r["impl"] == ref and "total_us" in r), None)
        if base:
            for r in rows:
                if "total_us" in r:
                    r[f"x_vs_{ref}"] = base["total_us"] / r["total_us"]
    return rows


def table(rows: list[dict]) -> str:
    header = ["family", "case", "impl", "fwd us", "bwd us", "fwd+bwd / step us", "GB/s", "% copy",
              "x eager", "x compile", "x foreach", "graph us", "% copy (graph)", "TFLOP/s", "% peak"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["family"], r["case"], r["impl"], "n/a", "", "", "", "", "", "", r["error"][:60], "", "",
                         "", ""])
            continue
        fmt = lambda k, f="{:.1f}": f.format(r[k]) if k in r else ""  # noqa: E731
        body.append([r["family"], r["case"], r["impl"], fmt("fwd_us"), fmt("bwd_us"), fmt("total_us"), fmt("gbs"),
                     fmt("copy_frac", "{:.0%}"), fmt("x_vs_eager", "{:.2f}"), fmt("x_vs_compile", "{:.2f}"),
                     fmt("x_vs_foreach", "{:.2f}"), fmt("graph_us") or r.get("graph_error", "")[:40],
                     fmt("graph_copy_frac", "{:.0%}"), fmt("tflops"), fmt("peak_frac", "{:.0%}")])
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    parser.add_argument("--family", action="append", help="only these op families (repeatable)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"{device_name(device)}: copy bandwidth {copy_gbs:.0f} GB/s (read + write)", flush=True)
    stem = "kernels" if not args.family else "kernels_" + "_".join(args.family)
    rows: list[dict] = []
    meta: dict = {"copy_gbs": copy_gbs}
    for module in discover(args.family):
        if hasattr(module, "matmul_peak_tflops") and "peak_tflops" not in meta:  # FLOP-bound families
            meta["peak_tflops"] = module.matmul_peak_tflops(device, args.quick)
            print(f"{device_name(device)}: matmul peak {meta['peak_tflops']:.1f} TFLOP/s", flush=True)
        for case in module.cases(device, args.quick):
            print(f"  {case.family}: {case.name}", flush=True)
            rows.extend(measure(case, device, copy_gbs, meta.get("peak_tflops")))
            if not args.no_save:  # after every case, so a run cut short still leaves its results
                paths = write_results(stem, device, [meta] + rows, table(rows))
    text = table(rows)
    if not args.no_save and rows:
        print(f"wrote {paths[0]} and {paths[1]}")
    print(f"\n{device_name(device)}, copy bandwidth {copy_gbs:.0f} GB/s\n{text}")


if __name__ == "__main__":
    main()
