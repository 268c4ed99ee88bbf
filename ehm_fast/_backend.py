"""The one dispatch point: which implementation of an op runs.

Backends: "cuda" (the compiled CUDA kernels), "triton", "cpu" (the compiled C++ CPU kernels) and
"torch" (the plain-PyTorch reference in `ehm_fast.reference`). "auto" picks cuda for CUDA tensors
when it was built (else triton), and the C++ kernels for CPU tensors.

Precedence: the `backend=` argument of an op, then `set_backend(...)`, then the environment
variable EHM_FAST_BACKEND, then "auto".
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from types import ModuleType
from typing import Iterator

import torch

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (torch must already be installed)"
_selected: str | None = None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Select the backend used by every op that is not given `backend=` (None: back to the env var / auto)."""
    global _selected
    _selected = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend in force when an op is not given `backend=`."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get("EHM_FAST_BACKEND", "auto") or "auto")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: `with ehm_fast.use_backend("torch"): ...`."""
    global _selected
    previous, _selected = _selected, _check_name(name)
    try:
        yield
    finally:
        _selected = previous


@functools.lru_cache(maxsize=None)
def _load_C() -> tuple[ModuleType | None, str]:
    try:
        from ehm_fast import _C
    except ImportError as exc:
        text = str(exc)
        if "undefined symbol" in text or "version" in text.lower():
            return None, (
                f"ehm_fast._C does not match the installed torch {torch.__version__} ({text}); rebuild: "
                + _BUILD_HINT
            )
        return None, f"ehm_fast._C is not built ({text}); " + _BUILD_HINT
    built = _C.torch_version()
    running = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    if built != running:
        return None, f"ehm_fast._C was built for torch {built} but torch {running} is running; rebuild: " + _BUILD_HINT
    return _C, ""


def compiled() -> ModuleType:
    """The compiled extension, or a clear ImportError saying how to build it."""
    module, why = _load_C()
    if module is None:
        raise ImportError(why)
    return module


def cpu_built() -> bool:
    return _load_C()[0] is not None


def cuda_built() -> bool:
    module = _load_C()[0]
    return module is not None and module.with_cuda()


def triton_available(device_type: str) -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if device_type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return device_type == "cuda"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@torch.compiler.assume_constant_result  # torch.compile evaluates it once while tracing
def resolve(backend: str | None, device: torch.device) -> str:
    """The concrete backend ("cuda", "triton", "cpu" or "torch") that runs on `device`."""
    name = _check_name(backend) if backend is not None else get_backend()
    kind = device.type
    if name == "auto":
        if kind == "cuda":
            if cuda_built():
                return "cuda"
            if triton_available("cuda"):
                return "triton"
        elif kind == "cpu" and cpu_built():
            return "cpu"
        _warn_once(f"ehm_fast: no compiled kernel for {kind} tensors, using the plain-PyTorch reference")
        return "torch"
    if name == "torch":
        return name
    if name == "cpu":
        if kind != "cpu":
            raise ValueError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
        compiled()
        return name
    if name == "cuda":
        if kind != "cuda":
            raise ValueError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
        if not cuda_built():
            compiled()
            raise RuntimeError(
                "ehm_fast was built without its CUDA kernels; rebuild on a machine with nvcc and a CUDA torch "
                "(`EHM_FAST_CUDA=1 pip install --no-build-isolation -e .` forces the CUDA build)"
            )
        return name
    # triton
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("backend 'triton' needs the triton package (`pip install triton`)") from exc
    if kind == "cpu" and not triton_available("cpu"):
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before Python starts"
        )
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"backend 'triton' runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got {device}")
    return name


@torch.compiler.assume_constant_result
def resolve_layer(backend: str | None, device: torch.device) -> str:
    """The implementation of a layer op of ehm_fast.nn ("triton" or "torch") that runs on `device`.

    The layers have Triton kernels and the plain-PyTorch reference, no C++/CUDA ones: "auto" and
    "cuda" take Triton on CUDA tensors; "auto" and "cpu" take the reference on CPU tensors (Triton
    there is the interpreter, for tests: ask for it with "triton")."""
    name = _check_name(backend) if backend is not None else get_backend()
    kind = device.type
    if name == "torch":
        return name
    if name in ("cpu", "cuda") and kind != name:
        raise ValueError(f"backend {name!r} runs on {name.upper()} tensors, got tensors on {device}")
    if name == "auto":
        if kind == "cuda" and triton_available("cuda"):
            return "triton"
        return "torch"
    if name == "cpu":
        return "torch"
    return resolve("triton", device)


def kernels_for(backend: str) -> ModuleType:
    """The module whose functions implement the compiled ops for a concrete backend.

    The C++/CUDA extension and the Triton package expose the same function names and signatures,
    so each op family calls `kernels_for(backend).<name>(...)`.
    """
    if backend in ("cpu", "cuda"):
        return compiled()
    if backend == "triton":
        import ehm_fast.kernels

        return ehm_fast.kernels
    raise ValueError(f"no compiled kernels for backend {backend!r}")
