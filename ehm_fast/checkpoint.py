"""Checkpoints: written atomically (temporary file, fsync, os.replace), read with clear errors,
and the random-number states of Python, NumPy, the CPU and every CUDA device."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "ehm_fast.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not ours; the CLI prints it as one line."""


def save(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` so that a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the checkpoint of a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r} (expected a .pt file or a run folder holding {CHECKPOINT_NAME})")
    return p


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save`; CheckpointError if it is not one."""
    p = resolve(path)
    try:
        # Our checkpoints hold the config as a plain dict and numpy RNG state; weights_only would refuse the latter.
        state = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, permissions: all mean "not readable"
        raise CheckpointError(f"checkpoint {str(p)!r} is corrupt or unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(p)!r} is not an ehm_fast checkpoint")
    return state


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Every generator's state; with a CUDA `device`, also that device's as "cuda_device" (what a
    data-parallel run restores on each process's own GPU)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        if device is not None and device.type == "cuda":
            state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)
    if "cuda_device" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)
