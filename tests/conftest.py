"""Test setup: the Triton interpreter for CPU tensors, the backends each device can run, and the
per-test random seed.

Without a GPU, Triton kernels run on CPU tensors under the interpreter; TRITON_INTERPRET must be
set before triton is first imported, hence here at the top. With a GPU it stays unset, so the
Triton tests compile real GPU kernels (the interpreter would also capture CUDA tensors).

Every test draws fresh random inputs: torch, NumPy and Python's `random` are seeded per test from
os.urandom, and a failing test's report names its seed. EHM_TEST_SEED=<seed> replays it:

    EHM_TEST_SEED=1234567 python -m pytest tests/test_vamp.py -k the_failing_test
"""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ehm_fast import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
SEED_VAR = "EHM_TEST_SEED"
_SEED = pytest.StashKey[int]()


def kernel_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs of every compiled path this machine can run; GPU ones are listed
    always and skipped without a GPU, so they are never silently dropped."""
    pairs = [("cpu", "cpu"), ("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")]
    return pairs


def _skip_reason(backend: str, device: str) -> str | None:
    if device == "cuda" and not HAS_CUDA:
        return "no CUDA device"
    if backend in ("cpu", "cuda") and not _backend.cpu_built():
        return "ehm_fast._C is not built"
    if backend == "cuda" and not _backend.cuda_built():
        return "ehm_fast._C was built without CUDA"
    if backend == "triton" and not _backend.triton_available(device):
        return "triton cannot run here"
    return None


@pytest.fixture(params=kernel_backends(), ids=lambda p: f"{p[0]}-{p[1]}")
def backend_device(request) -> tuple[str, str]:
    """Parametrises a test over every compiled backend; skips the ones this machine lacks."""
    backend, device = request.param
    reason = _skip_reason(backend, device)
    if reason:
        pytest.skip(reason)
    return backend, device


def _fixed_seed() -> int | None:
    value = os.environ.get(SEED_VAR, "").strip()
    return int(value) if value else None


def pytest_report_header(config) -> str:
    fixed = _fixed_seed()
    if fixed is not None:
        return f"random seed: {SEED_VAR}={fixed} for every test"
    return f"random seed: fresh per test (os.urandom); a failure names its seed, {SEED_VAR}=<seed> replays it"


@pytest.fixture(autouse=True)
def _fresh_seed(request) -> int:
    """Seeds torch (CPU and CUDA), NumPy's global generator and Python's `random` alike."""
    fixed = _fixed_seed()
    seed = fixed if fixed is not None else int.from_bytes(os.urandom(4), "little")
    request.node.stash[_SEED] = seed
    request.node.user_properties.append(("seed", seed))  # in --junitxml reports
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = item.stash.get(_SEED, None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"{SEED_VAR}={seed} replays this test"))
    return report


_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _interpreter_setting_kept():
    """A test that leaves TRITON_INTERPRET changed would silently skip the Triton tests after it."""
    yield
    now = os.environ.get("TRITON_INTERPRET")
    if now != _INTERPRET_AT_START:
        os.environ.pop("TRITON_INTERPRET", None)
        if _INTERPRET_AT_START is not None:
            os.environ["TRITON_INTERPRET"] = _INTERPRET_AT_START
        pytest.fail(f"the test changed TRITON_INTERPRET ({_INTERPRET_AT_START!r} -> {now!r})")
