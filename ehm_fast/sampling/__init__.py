"""Sampling with the critic: Langevin refinement of generator codes, and AIS estimates of log Z.

- `langevin_latent(decoder, critic, z, steps, step_size, ...)`: discriminator-driven latent
  sampling, z <- z - eta grad(|z|^2/2 - w f(G(z))) + sqrt(2 eta) xi (a CUDA graph on a GPU).
- `ais_log_partition(f, log_proposal, x0, grad=None, *, n_steps, step_size, ...)`: annealed
  importance sampling from a normalised proposal to exp(f) with MALA moves; returns AISResult
  (log_z, log_weights, x, acceptance, step_size).
- `mala_step`: the fused step of those chains (Triton kernel + plain-PyTorch reference).

User documentation: docs/sampling.md.
"""

from .ais import AISResult, ais_log_partition, linear_schedule
from .langevin import check_langevin_args, langevin_latent, standard_normal_log_prior
from .mala import mala_step, mala_step_reference

__all__ = [
    "AISResult",
    "ais_log_partition",
    "check_langevin_args",
    "langevin_latent",
    "linear_schedule",
    "mala_step",
    "mala_step_reference",
    "standard_normal_log_prior",
]
