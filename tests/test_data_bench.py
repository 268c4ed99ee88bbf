"""The data benchmark runs end to end at a tiny size (its numbers are not checked here)."""

import math
import os

from benchmarks import bench_data


def test_bench_data_quick_runs(capsys):
    rows = bench_data.main(["--quick", "--images", "40", "--batch-size", "8"])
    assert [r["what"].split(",")[0] for r in rows][:3] == ["torchvision-style per-item LMDB+PIL", "ehm-prepare", "ehm-prepare"]
    assert len(rows) == 5 + ((os.cpu_count() or 1) > 1) and all(math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0 for r in rows)
    assert "| shard loader, ready batches on cpu |" in capsys.readouterr().out
