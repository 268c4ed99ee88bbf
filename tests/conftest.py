"""Test setup: the Triton interpreter for CPU tensors, and the backends each device can run.

Without a GPU, Triton kernels run on CPU tensors under the interpreter; TRITON_INTERPRET must be
set before triton is first imported, hence here at the top. With a GPU it stays unset, so the
Triton tests compile real GPU kernels (the interpreter would also capture CUDA tensors).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from ehm_fast import _backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


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


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    yield
