"""ehm_fast: fused kernels, losses, optimizers and a trainer for the Extended Helmholtz Machine."""

from ._backend import BACKENDS, get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["BACKENDS", "EHM", "get_backend", "set_backend", "use_backend", "__version__"]


def __getattr__(name: str):
    # The training step pulls in the models and losses: imported on first use, so `import ehm_fast` stays light.
    if name == "EHM":
        from .ehm import EHM

        return EHM
    raise AttributeError(f"module 'ehm_fast' has no attribute {name!r}")
