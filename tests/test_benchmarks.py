"""The benchmark scripts run (tiny CPU sizes) and report a number for every implementation."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_kernels, bench_train  # noqa: E402


def test_bench_kernels_quick(capsys):
    bench_kernels.main(["--quick", "--no-save", "--family", "log_partition", "--device", "cpu"])
    out = capsys.readouterr().out
    table = out[out.index("| family"):]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert rows and all("n/a" not in line for line in rows), table
    assert any("ehm:cpu" in line for line in rows) and any("eager" in line for line in rows)


def test_bench_train_quick(capsys):
    bench_train.main(["--quick", "--no-save", "--device", "cpu", "--rows", "1", "--rows", "3"])
    out = capsys.readouterr().out
    table = out[out.index("| row"):]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 2 and all("n/a" not in line for line in rows), table
