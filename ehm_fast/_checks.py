"""Argument checks shared by the public ops: each error names the argument at fault."""

from __future__ import annotations

import torch

REDUCTIONS = ("none", "mean", "sum")


def check_float(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if value.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device: {where}")
    return next(iter(present.values())).device


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def check_batched(name: str, value: torch.Tensor, min_dim: int = 2) -> None:
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have a batch dimension and at least {min_dim} dims, got shape {tuple(value.shape)}")
    if value.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(value.shape)})")


def image_scale(log_scale: torch.Tensor | float, x: torch.Tensor, name: str = "log_scale") -> torch.Tensor:
    """log_scale as a tensor that broadcasts to one image x.shape[1:] (a leading 1 is allowed)."""
    if not isinstance(log_scale, torch.Tensor):
        if not isinstance(log_scale, (int, float)):
            raise TypeError(f"{name} must be a float or a floating-point tensor, got {type(log_scale).__name__}")
        return torch.tensor(float(log_scale), dtype=x.dtype, device=x.device)
    check_float(name, log_scale)
    image = tuple(x.shape[1:])
    shape = tuple(log_scale.shape)
    if len(shape) == len(image) + 1 and shape[0] == 1:
        shape = shape[1:]
    ok = len(shape) <= len(image) and all(s in (1, i) for s, i in zip(shape[::-1], image[::-1]))
    if not ok:
        raise ValueError(
            f"{name} of shape {tuple(log_scale.shape)} does not broadcast to one image of shape {image}; "
            "use a scalar, [C, 1, 1] per channel, or [C, H, W] per pixel"
        )
    return log_scale.reshape(shape)
