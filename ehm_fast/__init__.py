"""ehm_fast: fused kernels, losses, optimizers and a trainer for the Extended Helmholtz Machine."""

from ._backend import BACKENDS, get_backend, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "__version__"]
