"""Data pipeline throughput on a synthetic LSUN-format LMDB built here (WebP, shorter side 256).

    python benchmarks/bench_data.py [--quick] [--images 2000] [--size 64] [--write]

Reports images/s for: torchvision-style per-item loading (LMDB get + PIL decode + resize per
item, as torchvision's LSUN class does in the training loop), `ehm-prepare` (1 worker and all
cores), and the shard loader delivering ready [-1, 1] batches on the device (CUDA when present),
plus the same loader reading the LMDB directly. --write saves benchmarks/results/data_<device>_<date>.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import device_name, markdown_table, write_results  # noqa: E402
from ehm_fast.data import BatchLoader, Shards, open_images, prepare  # noqa: E402
from ehm_fast.data.synthetic import make_lsun  # noqa: E402


class TorchvisionStyleLSUN(torch.utils.data.Dataset):
    """What torchvision's LSUNClass does per item: one txn.get, PIL decode, Resize + CenterCrop
    + ToTensor + Normalize (the environment is opened in __init__, keys listed up front)."""

    def __init__(self, path: Path, size: int) -> None:
        import lmdb

        self.env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False)
        with self.env.begin() as txn:
            self.keys = list(txn.cursor().iternext(keys=True, values=False))
        self.size = size

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> torch.Tensor:
        with self.env.begin() as txn:
            data = txn.get(self.keys[i])
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        scale = self.size / min(w, h)  # Resize(size): shorter side to size, then CenterCrop(size)
        img = img.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.Resampling.BILINEAR)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
        return x.sub_(0.5).div_(0.5)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def bench_torchvision_style(db: Path, size: int, n: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process)."""
    ds = TorchvisionStyleLSUN(db, size)
    n = min(n, len(ds))
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        ds[i]
    return rate(n, time.perf_counter() - t0), rate(n, time.process_time() - c0)


def bench_decode_alone(encoded: list[bytes]) -> float:
    """Images per second that Pillow (libwebp) decodes in one thread, nothing else: the ceiling of
    any per-worker preparation rate that decodes with it."""
    t0 = time.perf_counter()
    for data in encoded:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    return rate(len(encoded), time.perf_counter() - t0)


def bench_prepare(db: Path, out: Path, size: int, workers: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second: meaningful for 1 worker, which runs in-process)."""
    c0 = time.process_time()
    index = prepare(f"lsun:{db}", out, size, workers=workers, shard_size=1000, progress=False)
    return index["report"]["images_per_s"], rate(index["num_images"], time.process_time() - c0)


def bench_loader(images, batch_size: int, batches: int, device: torch.device, workers: int, dtype=torch.float32) -> float:
    with BatchLoader(images, batch_size, seed=0, device=device, dtype=dtype, workers=workers, prefetch=6) as loader:
        for _ in range(min(3, batches)):  # warm-up: threads started, pages mapped
            next(loader)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batches):
            x = next(loader)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert x.shape[0] == batch_size
        return rate(batches * batch_size, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (CI)")
    p.add_argument("--images", type=int, default=None, help="images in the synthetic LMDB (default 2000, quick 120)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--write", action="store_true", help="write the results under benchmarks/results/")
    args = p.parse_args(argv)
    n = args.images or (120 if args.quick else 2000)
    batch = min(args.batch_size, n // 2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cores = os.cpu_count() or 1
    loader_workers = min(4, cores)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        items = make_lsun(tmp / "db", n, seed=0, formats=("WEBP",))
        mean_kb = np.mean([len(v) for v in items.values()]) / 1024
        print(f"built {n} WebP images (shorter side 256, mean {mean_kb:.1f} KiB) in {time.perf_counter() - t0:.1f} s", flush=True)

        def add(what: str, workers: str, ips: float, note: str = "") -> None:
            rows.append({"what": what, "workers": workers, "images_per_s": ips, "note": note})
            print(f"{what:45s} {workers:>10s} {ips:10.0f} images/s {note}", flush=True)

        decode = bench_decode_alone(list(items.values())[:500])
        add("WebP decode alone (Pillow / libwebp)", "1 (main)", decode, "the ceiling of one preparation worker")
        wall, cpu = bench_torchvision_style(tmp / "db", args.size, min(n, 500))
        add("torchvision-style per-item LMDB+PIL", "1 (main)", wall, f"{cpu:.0f} per CPU-second")
        wall, cpu = bench_prepare(tmp / "db", tmp / "s1", args.size, 1)
        add("ehm-prepare", "1 process", wall, f"{cpu:.0f} per CPU-second, {wall / decode:.0%} of decode alone")
        if cores > 1:
            wall, _ = bench_prepare(tmp / "db", tmp / "sN", args.size, cores)
            add("ehm-prepare", f"{cores} processes", wall, f"{wall / cores:.0f} per worker")
        shards = Shards(tmp / "s1")
        reps = 20 if args.quick else 200
        add(f"shard loader, ready batches on {device.type}", f"{loader_workers} threads", bench_loader(shards, batch, reps, device, loader_workers), f"batch {batch}, float32 [-1, 1], random flips")
        add("shard loader, ready batches (bf16)", f"{loader_workers} threads", bench_loader(shards, batch, reps, device, loader_workers, torch.bfloat16), "same, bfloat16")
        direct = open_images(f"lsun:{tmp / 'db'}", args.size)
        add(f"loader reading the LMDB directly on {device.type}", f"{loader_workers} threads", bench_loader(direct, min(batch, 64), 4 if args.quick else 20, device, loader_workers), "decodes in the loop")
    name = device_name(device)
    table = markdown_table(["what", "workers", "images/s", "note"], [[r["what"], r["workers"], f"{r['images_per_s']:.0f}", r["note"]] for r in rows])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"{n} synthetic WebP images, shorter side 256, mean {mean_kb:.1f} KiB, prepared at {args.size}x{args.size}; "
        f"{cores} cores ({cpu_model()}), load average {load:.1f} at the end; device: {name}"
    )
    print("\n" + header + "\n" + table)
    if args.write:
        for path in write_results("data", device, rows, header + "\n\n" + table):
            print("wrote", path)
    return rows


if __name__ == "__main__":
    main()
