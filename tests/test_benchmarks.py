"""The benchmark scripts run (tiny CPU sizes) and report a number for every implementation."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_kernels, bench_train, profile_train  # noqa: E402


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


def test_profile_train_quick(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(profile_train, "RESULTS", tmp_path)  # the traces go here, not into the repository
    profile_train.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    table = out[out.index("| share of one iteration"):].splitlines()
    assert table[0].count("|") == 6  # the category column and four rows
    wall = next(line for line in table if line.startswith("| wall"))
    assert all(float(cell.split()[0]) > 0 for cell in wall.strip("|").split("|")[1:]), wall
    assert any(line.startswith("| convolution") for line in table)
    assert len(list(tmp_path.glob("trace_*_4.json"))) == 4


def test_no_undefined_names_in_code_that_only_runs_on_a_gpu():
    """The CUDA-graph timing and other GPU-only paths never run in CI: a static check for undefined
    and unused names catches what a run would (a missing import once cost a GPU session its kernel
    graph timings)."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([ruff, "check", "--no-cache", "--select", "F821,F811,F841,F401", "--exclude", "build",
                        "benchmarks", "ehm_fast", "kernels", "tests"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
