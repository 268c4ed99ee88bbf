"""The benchmark scripts run (tiny CPU sizes) and report a number for every implementation."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_kernels, bench_train, harness, profile_train  # noqa: E402
from ehm_fast.nn.options import LEVERS  # noqa: E402


def test_bench_kernels_quick(capsys):
    bench_kernels.main(["--quick", "--no-save", "--family", "log_partition", "--device", "cpu"])
    out = capsys.readouterr().out
    table = out[out.index("| family"):]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert rows and all("n/a" not in line for line in rows), table
    assert any("ehm:cpu" in line for line in rows) and any("eager" in line for line in rows)


def _results(folder: Path, stem: str) -> list[dict]:
    (path,) = folder.glob(f"{stem}_*.json")
    return json.loads(path.read_text())["rows"]


def test_bench_train_quick(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)  # the results go here, not into the repository
    bench_train.main(["--quick", "--device", "cpu", "--rows", "1", "--rows", "3", "--rows", "4 ehm_fast -conv"])
    out = capsys.readouterr().out
    table = out[out.index("| row"):]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 3 and all("n/a" not in line and "count failed" not in line for line in rows), table
    assert "losses, ehm_fast fp32 with every layer lever vs none" in out
    head, *timed = _results(tmp_path, "train")
    assert set(head["loss_agreement"]) >= {"fp32 fused", "fp32 all levers vs none"}
    ehm = next(r for r in timed if r["row"] == "3 ehm_fast")
    assert ehm["tflop_per_iter_own"] > 0 and ehm["mfu_own"] > 0, ehm
    assert "tflop_per_iter_own" not in timed[0]  # the plain row has only the common yardstick


def test_bench_train_has_a_row_per_layer_lever():
    names = [name for name, _, _ in bench_train.ROWS]
    levers = [f"4 ehm_fast -{lever}" for lever in LEVERS] + ["4 ehm_fast -all layer levers"]
    # right after row 3, so a run cut short by its time limit has them
    assert names[names.index("3 ehm_fast") + 1:][:len(levers)] == levers


def test_bench_train_rows_on_the_cpu_are_what_runs_there(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    bench_train.main(["--quick", "--device", "cpu", "--rows", "2", "--rows", "4 ehm_fast -bf16"])
    out = capsys.readouterr().out
    assert "skipped on the CPU (what it switches off is off there): 4 ehm_fast -bf16" in out
    assert [r["row"] for r in _results(tmp_path, "train")[1:]] == ["2 plain+bf16+cl"]
    numbers = [int(name.split()[0]) for name, _, _ in bench_train.ROWS]
    assert numbers == sorted(numbers)  # the table reads in row order


def test_profile_train_quick(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "RESULTS", tmp_path)  # traces and results go here, not into the repository
    profile_train.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    table = out[out.index("| share of one iteration"):].splitlines()
    assert table[0].count("|") == 7  # the category column and five rows
    wall = next(line for line in table if line.startswith("| wall"))
    assert all(float(cell.split()[0]) > 0 for cell in wall.strip("|").split("|")[1:]), wall
    assert any(line.startswith("| convolution") for line in table)
    assert len(list(tmp_path.glob("trace_*_4.json"))) == 5
    rows = {r["row"]: r for r in _results(tmp_path, "profile")}
    ehm = rows[profile_train.EHM_ROW]
    for name in ("critic_step", "generator_step", "penalty_input_gradient", "backward", "critic.layer1",
                 "encoder.heads", "decoder.top"):
        assert ehm["ranges"][name]["us"] > 0, name
    assert len(ehm["top"]) > 10 and all(t["us"] >= 0 for t in ehm["top"])
    assert not rows["plain"]["ranges"]  # the plain baseline has no ranges of its own
    markdown = next(tmp_path.glob("profile_*.md")).read_text()
    assert "| critic.layer1 |" in markdown and f"Top kernels of {profile_train.EHM_ROW}" in markdown


def test_profile_ranges_on_a_gpu_count_kernels_launched_on_other_threads():
    """A range's device time on a GPU: the kernels of every host op that began inside it, the
    autograd engine's thread included (the GPU path of range_times, which CI cannot run)."""
    cpu = torch.autograd.DeviceType.CPU

    def event(name, start, end, thread=1, kernels=()):
        span = SimpleNamespace(start=start, end=end)
        return SimpleNamespace(name=name, device_type=cpu, thread=thread, time_range=span,
                               kernels=[SimpleNamespace(duration=d) for d in kernels])

    events = [
        event("critic_step", 0, 100),
        event("critic.layer1", 0, 10), event("aten::conv", 1, 5, kernels=[3.0]),
        event("critic.layer1", 20, 30), event("aten::conv", 21, 25, kernels=[2.0, 1.0]),
        event("backward", 40, 90), event("aten::conv_backward", 50, 60, thread=2, kernels=[7.0]),
        event("aten::add", 95, 99, kernels=[0.5]),  # inside critic_step only
        event("aten::mul", 120, 130, kernels=[9.0]),  # in no range
    ]
    times = profile_train.range_times(events, cuda=True)
    assert times == {"critic_step": {"calls": 1, "us": 13.5}, "critic.layer1": {"calls": 2, "us": 6.0},
                     "backward": {"calls": 1, "us": 7.0}}
    assert profile_train.range_times(events, cuda=False)["critic.layer1"] == {"calls": 2, "us": 20}


def test_no_undefined_names_in_code_that_only_runs_on_a_gpu():
    """The CUDA-graph timing and other GPU-only paths never run in CI: a static check for undefined
    and unused names catches what a run would (a missing import once cost a GPU session its kernel
    graph timings)."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([ruff, "check", "--no-cache", "--select", "F821,F811,F841,F401", "--exclude", "build",
                        "benchmarks", "ehm_fast", "kernels", "scripts", "tests"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_vr_study_quick(capsys, tmp_path):
    from benchmarks import vr_study

    assert vr_study.main(["--quick", "--work", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    table = out[out.index("| optimizer | step"):].split("\n\n")[0].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in table] == list(vr_study.OPTIMIZERS)
    for row in table[1:]:  # svrg and storm: two steps from their reference point the control
        assert 0 < float(row.split("|")[5]) < 1, row  # variate must cut the variance (same batch replayed)
    picture = vr_study.side_by_side({"adam": torch.rand(4, 1, 8, 8) * 2 - 1, "svrg": torch.zeros(4, 1, 8, 8)},
                                    tmp_path / "grid.png")
    from PIL import Image

    assert Image.open(picture).size[1] == 2 * (8 + 4)  # two bands of one row each (2 px gaps)
