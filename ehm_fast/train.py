"""`ehm-train`: train an Extended Helmholtz Machine (or a baseline) and leave a run folder.

With no arguments it trains on the embedded digits data on whatever device is present. The run
folder holds sample and reconstruction grids, loss.png, metrics.jsonl, summary.json, TensorBoard
events (tb/) and checkpoint.pt (written atomically every --ckpt-every steps, at the end, and on
SIGINT/SIGTERM). `--resume RUN_DIR_OR_FILE` continues a run exactly where it stopped.

Under `torchrun --nproc_per_node N -m ehm_fast.train ...` it trains data-parallel (DDP; NCCL on
GPUs, gloo on CPUs): --batch-size is the global batch, each process reads its own slice of every
batch, and only rank 0 writes the run folder (docs/ddp.md).

This module is the command line (flags, config file, resume, exit codes); the loop is
`ehm_fast.trainer.Run`, and loading a trained run is `ehm_fast.runs`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist  # noqa: F401 - tests/test_distributed.py patches train.dist

from . import checkpoint as ckpt
from .cli import OneLineParser
from .config import ConfigError, TrainConfig, add_arguments, apply_overrides, from_dict, load_file
from .distributed import setup_process_group as _init_process_group  # noqa: F401 - its old name, for tests
from .runs import build_models, load_generator, load_models
from .trainer import PROG, DataError, Run, TrainingStopped

# The names scripts imported from here before the loop and the loaders moved out stay importable.
__all__ = ["ConfigError", "Run", "TrainingStopped", "build_models", "build_parser", "configure", "load_generator",
           "load_models", "main"]

USER_ERRORS = (ConfigError, DataError, ckpt.CheckpointError)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Train an Extended Helmholtz Machine (VAE/GAN hybrid) on images. Options come from the "
        "defaults, then --config FILE, then the flags given here.",
    )
    p.add_argument("--config", metavar="FILE", help="YAML (.yaml/.yml) or TOML (.toml) file of options (keys as below, "
                   "with underscores)")
    p.add_argument("--resume", metavar="PATH", help="continue from a checkpoint file or a run folder (its config, "
                   "overridden by --config and flags, e.g. a larger --steps)")
    add_arguments(p)
    return p


def configure(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any] | None, Path | None]:
    """Parse flags, config file and resumed checkpoint into (config, checkpoint state, its path)."""
    args = build_parser().parse_args(argv)
    state, path, cfg = None, None, TrainConfig()
    if args.resume:
        path = ckpt.resolve(args.resume)
        state = ckpt.load(path)
        # The run goes on in the checkpoint's folder unless --out says otherwise.
        cfg = dataclasses.replace(from_dict(state["config"]), out=None)
    if args.config:
        cfg = apply_overrides(cfg, load_file(args.config), args.config)
    names = {f for f in vars(args) if f not in ("config", "resume")}
    return apply_overrides(cfg, {k: getattr(args, k) for k in names}, "command line"), state, path


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, state, path = configure(argv)
        Run(cfg, state, path).train()
    except USER_ERRORS as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
