"""ehm_fast: fused kernels, losses, optimizers and a trainer for the Extended Helmholtz Machine."""

import importlib

from ._backend import BACKENDS, get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["BACKENDS", "EHM", "get_backend", "set_backend", "use_backend", "losses", "optim", "__version__"]

_SUBMODULES = ("losses", "optim", "models", "data", "distributed", "reference")


def __getattr__(name: str):
    # Submodules and the training step load on first use, so `import ehm_fast` stays light.
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "EHM":
        from .ehm import EHM

        return EHM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
