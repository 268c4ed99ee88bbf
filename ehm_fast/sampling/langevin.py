"""The critic as a sampler: Langevin dynamics in latent space (discriminator-driven latent sampling).

With a generator G and a critic f ≈ log p_D, the density p(z) exp(w f(G(z))) over codes is the
prior reweighted by the critic (Che et al. 2020, "Your GAN is secretly an energy-based model").
Its energy is E(z) = -log p(z) - w f(G(z)) (|z|^2 / 2 + const for the N(0, I) prior), and the
(unadjusted) Langevin chain

    z <- z - eta grad E(z) + sqrt(2 eta) xi,    xi ~ N(0, I)

samples it approximately for small eta (noise=False: gradient descent on E). On CUDA tensors the
whole chain of K steps is one CUDA graph (captured after two warm-up steps, then replayed); the
graphs of the last few (modules, shape, settings) are kept, so a repeated call only replays. The
eager path runs the very same step function.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import Tensor, nn

LogDensity = Callable[[Tensor], Tensor]
_GRAPHS: "OrderedDict[tuple, _CapturedChain]" = OrderedDict()
_MAX_GRAPHS = 4
_WARMUP_STEPS = 2


def check_langevin_args(steps: int, step_size: float, critic_weight: float) -> None:
    """ValueError unless steps >= 1, step_size > 0 and critic_weight >= 0 (all finite)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"the number of Langevin steps must be an integer >= 1, got {steps!r}")
    if not isinstance(step_size, (int, float)) or not math.isfinite(step_size) or step_size <= 0:
        raise ValueError(f"the Langevin step size must be a finite number > 0, got {step_size!r}")
    if not isinstance(critic_weight, (int, float)) or not math.isfinite(critic_weight) or critic_weight < 0:
        raise ValueError(f"the critic weight must be a finite number >= 0, got {critic_weight!r}")


def standard_normal_log_prior(z: Tensor) -> Tensor:
    """log N(z; 0, I) up to its constant: -|z|^2 / 2 per row."""
    return -0.5 * z.pow(2).sum(1)


def _run_chain(decoder: nn.Module, critic: nn.Module, z: Tensor, steps: int, step_size: float, critic_weight: float,
               noise: bool, log_prior: LogDensity) -> Tensor:
    scale = math.sqrt(2 * step_size)
    with torch.enable_grad():
        for _ in range(steps):
            z = z.detach().requires_grad_(True)
            energy = -log_prior(z) - critic_weight * critic(decoder(z)).to(z.dtype)
            (g,) = torch.autograd.grad(energy.sum(), z)
            z = z.detach() - step_size * g
            if noise:
                z = z + scale * torch.randn_like(z)
    return z.detach()


class _CapturedChain:
    """The K steps captured once into a CUDA graph; replay reads z_in and writes z_out."""

    def __init__(self, chain: Callable[[Tensor, int], Tensor], z: Tensor) -> None:
        self.z_in = z.detach().clone()
        side = torch.cuda.Stream(z.device)
        side.wait_stream(torch.cuda.current_stream(z.device))
        with torch.cuda.stream(side):  # lazy initialisation, cuDNN and Triton autotuning stay outside the capture
            chain(self.z_in, _WARMUP_STEPS)
        torch.cuda.current_stream(z.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.z_out = chain(self.z_in, -1)

    def __call__(self, z: Tensor) -> Tensor:
        self.z_in.copy_(z)
        self.graph.replay()
        return self.z_out.clone()  # the next replay overwrites z_out


def _graph_key(decoder: nn.Module, critic: nn.Module, log_prior: LogDensity, z: Tensor, settings: tuple) -> tuple:
    """What a captured chain bakes in: the modules' tensors (by address) and modes, z's layout, the settings."""
    tensors = [t.data_ptr() for m in (decoder, critic) for t in (*m.parameters(), *m.buffers())]
    modes = tuple(m.training for m in (*decoder.modules(), *critic.modules()))
    return (id(decoder), id(critic), id(log_prior), tuple(tensors), modes, tuple(z.shape), z.dtype, z.device, settings)


def langevin_latent(decoder: nn.Module, critic: nn.Module, z: Tensor, steps: int, step_size: float, *,
                    critic_weight: float = 1.0, noise: bool = True, log_prior: Optional[LogDensity] = None,
                    cuda_graph: Optional[bool] = None) -> Tensor:
    """K Langevin steps on E(z) = -log p(z) - critic_weight * f(G(z)) from codes z [B, k]; returns the
    refined codes (detached, z's shape). decoder(z) gives images, critic(images) gives f [B].

    log_prior: z -> log p(z) [B] up to a constant (default N(0, I): -|z|^2 / 2). noise=False drops
    the injected noise (gradient descent on E). cuda_graph: capture the chain in a CUDA graph (None:
    on CUDA tensors; a failed capture then falls back to the eager chain with a warning). The graph
    reads the modules' parameters where they lie, so in-place updates are seen; the modules should
    be in eval mode (a batch-norm layer in train mode would use the chain's batch statistics).
    """
    check_langevin_args(steps, step_size, critic_weight)
    if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() != 2 or z.shape[0] == 0:
        raise ValueError(f"z must be a floating-point [B, k] batch of codes with B >= 1, got "
                         f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
    prior = log_prior or standard_normal_log_prior
    settings = (steps, float(step_size), float(critic_weight), bool(noise))

    def chain(z_start: Tensor, n: int) -> Tensor:
        return _run_chain(decoder, critic, z_start, steps if n < 0 else n, step_size, critic_weight, noise, prior)

    use_graph = z.is_cuda if cuda_graph is None else cuda_graph
    if not use_graph:
        return chain(z, -1)
    if not z.is_cuda:
        raise ValueError(f"cuda_graph=True needs CUDA tensors, got z on {z.device}")
    key = _graph_key(decoder, critic, prior, z, settings)
    captured = _GRAPHS.get(key)
    if captured is None:
        try:
            captured = _CapturedChain(chain, z)
        except RuntimeError as exc:
            if cuda_graph:
                raise
            warnings.warn(f"langevin_latent: CUDA graph capture failed ({str(exc).splitlines()[0]}); running the "
                          "chain eagerly (pass cuda_graph=False to skip the attempt)", RuntimeWarning, stacklevel=2)
            return chain(z, -1)
        _GRAPHS[key] = captured
        while len(_GRAPHS) > _MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    _GRAPHS.move_to_end(key)
    return captured(z)
