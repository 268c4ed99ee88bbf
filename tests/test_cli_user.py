"""What a new user of ehm-train met: output to a pipe that breaks, a log file full of carriage
returns, --steps 0, and the help text."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ehm_fast import checkpoint as ckpt
from ehm_fast import train
from ehm_fast.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "4", "--critic-width", "4", "--z-dim", "4", "--batch-size", "8", "--n-critic", "1",
        "--log-every", "1", "--sample-every", "100", "--ckpt-every", "100", "--n-samples", "4", "--device", "cpu"]


class BreaksAfter(io.StringIO):
    """A stderr whose reader goes away after `writes` writes (tee ended by the same Ctrl-C)."""

    def __init__(self, writes: int, tty: bool) -> None:
        super().__init__()
        self.writes, self.tty = writes, tty

    def write(self, text: str) -> int:
        if self.writes == 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.writes -= 1
        return super().write(text)

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [False, True])
def test_a_broken_stderr_stops_the_run_cleanly_with_its_checkpoint(tmp_path, monkeypatch, tty):
    # Plain lines (log_every 1, 60 steps: one every 3 steps): the announcement, step 1, then step 3
    # breaks. On a terminal the bar's first drawing, after step 1, breaks.
    stream = BreaksAfter(2 if not tty else 1, tty)
    monkeypatch.setattr(sys, "stderr", stream)
    out = tmp_path / "run"
    assert train.main([*TINY, "--steps", "60", "--out", str(out)]) == 0
    stopped_at = 1 if tty else 3
    assert ckpt.load(out)["step"] == stopped_at
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "broken stderr" and summary["step"] == stopped_at
    assert (out / "loss.png").is_file() and (out / "samples_final.png").is_file()
    assert "stopped by" not in stream.getvalue()  # nothing written after the break
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a reader again: the run goes on from there
    assert train.main(["--resume", str(out), "--steps", "5"]) == 0
    assert ckpt.load(out)["step"] == 5


def test_ctrl_c_on_a_piped_run_keeps_the_checkpoint(tmp_path):
    """`ehm-train 2>&1 | tee log`, then Ctrl-C: SIGINT reaches both, tee's end of the pipe closes."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "ehm_fast.train", *TINY, "--steps", "100000", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.time() < deadline, "the run did not start"
            time.sleep(0.2)
        proc.stdout.close()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert 1 <= ckpt.load(out)["step"] < 100000
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "SIGINT"


def test_a_file_gets_plain_progress_lines_not_a_redrawn_bar(tmp_path, capsys):
    assert train.main([*TINY, "--steps", "40", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("ehm-train: step ")]
    # 40 steps logged every step: a line every 2 steps (about 20 a run), the first and the last
    assert [line.split()[2] for line in lines] == ["1/40"] + [f"{s}/40" for s in range(2, 41, 2)]
    assert "(100%)" in lines[-1] and "critic" in lines[-1] and "img/s" in lines[-1] and "eta" in lines[-2]


def test_plain_lines_come_from_log_steps():
    p = Progress(1000, 0, log_every=30, prog="x", stream=io.StringIO())
    assert p.line_every == 60 and not p.broken  # a multiple of log_every, about 20 lines a run


def test_steps_zero_names_only_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main([*TINY, "--steps", "0", "--out", str(out)]) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("ehm-train: nothing to train (--steps 0) at step 0;"), last
    assert "loss.png" not in last and "metrics.jsonl" not in last and "samples" not in last
    assert (out / "checkpoint.pt").is_file() and (out / "summary.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["checkpoint.pt", "summary.json"]


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    options = text.split("\n  --")[1:]  # one entry per option, its help text wrapped over lines
    for option in options:
        assert option.count("(default") <= 1, option
    assert "log 0.1" in text and "-2.3025850929940455" not in text
    assert "zip:PATH" in text and "shards:DIR" in text
    assert "beat" not in text and "timed" not in text and "CPU minutes" not in text
