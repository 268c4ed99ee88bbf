"""The per-test seed of conftest.py: a failure names it and EHM_TEST_SEED replays the same draws.

Runs a tiny failing test in a child pytest with this suite's conftest, reads the seed from its
failure report, and runs it again with EHM_TEST_SEED set.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import SEED_VAR

DRAWS = '''
import random

import numpy as np
import torch


def test_draws():
    print("draws", torch.rand(1).item(), np.random.rand(), random.random())
    assert False
'''


def _run(folder: Path, seed: int | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != SEED_VAR}
    if seed is not None:
        env[SEED_VAR] = str(seed)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_draws.py"], cwd=folder,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr  # the test fails on purpose
    return r.stdout


def _draws(out: str) -> str:
    return re.search(r"^draws .*$", out, re.M).group(0)


def test_a_failure_names_its_seed_and_the_variable_replays_it(tmp_path):
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_draws.py").write_text(DRAWS)
    first = _run(tmp_path, None)
    assert "random seed: fresh per test" in first
    seed = int(re.search(rf"{SEED_VAR}=(\d+) replays this test", first).group(1))
    replay = _run(tmp_path, seed)
    assert f"random seed: {SEED_VAR}={seed} for every test" in replay  # the header says so
    assert _draws(replay) == _draws(first)  # torch, NumPy and random alike
