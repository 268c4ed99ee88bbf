"""The networks of a training run: built from its config, or loaded from its checkpoint.

`checkpoint` is the file format alone; this module knows how a config becomes networks, so that
ehm-sample, ehm-fid and user scripts load a run without importing the trainer.
"""

from __future__ import annotations

import os

import torch

from . import checkpoint as ckpt
from .config import TrainConfig, from_dict
from .models import EHMModels, check_image_size


def build_models(cfg: TrainConfig, channels: int) -> EHMModels:
    """Fresh networks (encoder, decoder, critic, prior) as `cfg` describes them."""
    return EHMModels(
        image_size=check_image_size(cfg.image_size),
        channels=channels,
        z_dim=cfg.z_dim,
        width=cfg.width,
        critic_width=cfg.critic_width,
        norm=cfg.norm,
        critic_norm=cfg.critic_norm,
        share_weights=cfg.share_weights,
        likelihood=cfg.likelihood,
        log_scale=cfg.log_scale,
        learn_scale=cfg.learn_scale,
        scale_shape=cfg.scale_shape,
        prior=cfg.prior,
        vamp_components=cfg.vamp_components,
    )


def load_models(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[EHMModels, TrainConfig]:
    """All the networks of a checkpoint file or run folder (eval mode) and its config."""
    state = ckpt.load(path)
    cfg = from_dict(state["config"])
    models = build_models(cfg, state["channels"])
    try:
        models.load_state_dict(state["ehm"]["models"])
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"checkpoint {str(path)!r} does not match its own config: {str(exc).splitlines()[0]}") from None
    return models.to(device).eval(), cfg


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """The decoder of a checkpoint (eval mode; decoder(z) gives images in [-1, 1] from z [n, z_dim]),
    for FID tools. With prior=vamp draw z with `load_models(path)[0].sample_prior(n)` instead of N(0, I)."""
    models, cfg = load_models(path, device)
    return models.decoder, cfg
