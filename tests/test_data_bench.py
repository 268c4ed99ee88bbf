"""The data benchmark runs end to end at a tiny size (its numbers are not checked here)."""

import math
import os

import torch

from benchmarks import bench_data


def test_bench_data_quick_runs(capsys):
    rows = bench_data.main(["--quick", "--images", "40", "--batch-size", "8"])
    assert [r["what"].split(",")[0] for r in rows][:4] == [
        "WebP decode alone (Pillow / libwebp)", "torchvision-style per-item LMDB+PIL", "ehm-prepare", "ehm-prepare"]
    assert len(rows) == 6 + ((os.cpu_count() or 1) > 1) and all(math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0 for r in rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"| shard loader, ready batches on {device} |" in capsys.readouterr().out
