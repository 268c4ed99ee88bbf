"""What every kernel benchmark shares: the Case record, timing, copy bandwidth, result files.

A case module (benchmarks/cases_<family>.py) exposes `cases(device, quick) -> list[Case]`;
benchmarks/bench_kernels.py times every implementation of every case.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    family: str  # op family, e.g. "log_partition"
    name: str  # the size, e.g. "M=256 3x64x64 fused"
    # bytes that must move: each input read once, each output written once
    bytes_fwd: int
    bytes_fwdbwd: int
    # label -> run(backward: bool). Labels: "ehm:<backend>", "eager", "compile", or any baseline.
    impls: dict[str, Callable[[bool], None]] = field(default_factory=dict)
    # "loss": forward / backward / forward+backward are timed; "step": one call is timed (optimizers)
    kind: str = "loss"


def median_time_us(fn: Callable[[], None], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median wall time of fn in microseconds (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        try:
            import triton.testing

            return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except ImportError:
            pass
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(1e3 * start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - t0))
    return statistics.median(times)


def capture_graph(fn: Callable[[], object], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, object]:
    """(graph, output) of fn() captured in a CUDA graph, after `warmup` calls on a side stream
    (lazy initialisation, autotuning and allocator pools stay out of the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def graph_time_us(fn: Callable[[], None], device: torch.device, copies: int = 4) -> float:
    """Median device time of fn replayed from CUDA graphs: the kernels without the host's launch
    and dispatch costs (which dominate small ops in eager mode). One graph per call of fn at
    capture, so a fn that rotates its inputs keeps rotating them between replays."""
    graphs = [capture_graph(fn, warmup=3 if i == 0 else 0)[0] for i in range(copies)]
    cycle = itertools.cycle(graphs)
    return median_time_us(lambda: next(cycle).replay(), device)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now."""
    n = nbytes // 4 if device.type == "cuda" else (nbytes // 16) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    us = median_time_us(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (us * 1e-6) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()}"


def write_results(stem: str, device: torch.device, rows: list[dict], table: str) -> tuple[Path, Path]:
    """Writes benchmarks/results/<stem>_<device>_<date>.{json,md} and returns both paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()
    date = time.strftime("%Y-%m-%d")
    base = RESULTS / f"{stem}_{slug}_{date}"
    meta = {"device": name, "date": date, "torch": torch.__version__, "rows": rows}
    base.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    base.with_suffix(".md").write_text(f"# {stem} on {name}, {date} (torch {torch.__version__})\n\n{table}\n")
    return base.with_suffix(".json"), base.with_suffix(".md")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def rotating_inputs(make: Callable[[], tuple], bytes_per_set: int, l2_bytes: int = 64 << 20) -> Iterator[tuple]:
    """Enough independent input sets to cycle through 2x the L2 cache, so timings read from HBM."""
    count = max(1, min(8, -(-2 * l2_bytes // max(bytes_per_set, 1))))
    return itertools.cycle([make() for _ in range(count)])
