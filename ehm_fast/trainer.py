"""The training loop behind `ehm-train`: one `Run` owns the models, the EHM step, the data, the
progress output, the logs and the checkpoints of a run folder.

Checkpoints are written atomically every --ckpt-every steps, at the end, and when the run is
asked to stop: by SIGINT/SIGTERM, or by a broken or closed stderr (the signal that ends a run
piped into `tee` ends tee too). The stop path writes the checkpoint before any other output.
Under torchrun every process runs a `Run`; only rank 0 writes the run folder.
"""

from __future__ import annotations

import json
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import distributed
from .config import ConfigError, TrainConfig, to_dict
from .data import open_data
from .models import EHMModels
from .nn.options import levers_for
from .progress import Progress
from .runs import build_models

PROG = "ehm-train"
BROKEN_OUTPUT = 1000  # the stop code of a broken stderr, above every signal number


class DataError(ValueError):
    """A data source that cannot be opened or read; the command line prints it as one line."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps)."""


def open_training_data(spec: str, image_size: int, per_rank: int, *, seed: int, rank: int, world_size: int,
                       device: torch.device, channels: int | None) -> Any:
    """ehm_fast.data's loader for the trainer: digits in one channel (unless a checkpoint says
    otherwise) and never mirrored, every other source RGB with random horizontal flips."""
    digits = spec == "digits"
    try:
        return open_data(spec, image_size, seed=seed, rank=rank, world_size=world_size, batch_size=per_rank,
                         device=device, channels=channels or (1 if digits else 3), flip=not digits)
    except (ValueError, OSError) as exc:
        raise DataError(str(exc).splitlines()[0]) from None


def _device(spec: str, local_rank: int, world_size: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda asked for, but no CUDA device is available")
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device {device} does not exist ({torch.cuda.device_count()} CUDA device(s))")
    elif device.type != "cpu":
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return device


def _run_dir(cfg: TrainConfig, resume: Path | None, world_size: int) -> Path:
    """--out, the resumed run's folder, or runs/<date-time> (with -2, -3, ... when two runs start in
    the same second); with several processes every rank takes rank 0's choice."""
    if cfg.out:
        return Path(cfg.out)
    if resume is not None:
        return resume.parent
    stamp = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    path, n = stamp, 1
    while path.exists():
        n += 1
        path = stamp.with_name(f"{stamp.name}-{n}")
    if world_size > 1:
        chosen = [str(path)]
        dist.broadcast_object_list(chosen, src=0)
        path = Path(chosen[0])
    return path


def _stop_name(code: int) -> str:
    return "broken stderr" if code == BROKEN_OUTPUT else signal.Signals(code).name


class Run:
    """One training run: models, the EHM step, data, logging and checkpoints."""

    def __init__(self, cfg: TrainConfig, resume_state: dict[str, Any] | None, resume_path: Path | None) -> None:
        launch = distributed.launched()
        self.rank, local_rank, self.world_size = launch.rank, launch.local_rank, launch.world_size
        w = self.world_size
        if cfg.batch_size % w:
            up = -(-cfg.batch_size // w) * w
            near = f"{up - w} or {up}" if up > w else str(up)
            raise ConfigError(f"batch_size {cfg.batch_size} (the global batch) does not divide among {w} processes: "
                              f"use a multiple of {w}, e.g. --batch-size {near}")
        self.device = _device(cfg.device, local_rank, w)
        self.cfg = cfg
        self.main = self.rank == 0
        self.backend = distributed.setup_process_group(self.device, w) if w > 1 else None
        per_rank = cfg.batch_size // w
        # The same seed on every process: identical initial weights, and the step draws its noise
        # for the global batch and takes this rank's slice, so the random state stays in step.
        torch.manual_seed(cfg.seed)
        self.loader = open_training_data(
            cfg.data, cfg.image_size, per_rank, seed=cfg.seed, rank=self.rank, world_size=self.world_size,
            device=self.device, channels=resume_state["channels"] if resume_state else None,
        )
        self.channels = int(self.loader.channels)
        self.models = self._sync_bn(build_models(cfg, self.channels).to(self.device))
        # A fixed batch and fixed noise for the grids, drawn without touching the training RNG.
        start = self.loader.state_dict()
        try:  # the first batch: a source none of whose images decodes fails here, before any output
            self.fixed_real = next(self.loader)[: min(32, per_rank)].clone()
        except (ValueError, OSError) as exc:
            self.loader.close()
            raise DataError(str(exc).splitlines()[0]) from None
        self.loader.load_state_dict(start)
        g = torch.Generator().manual_seed(cfg.seed + 12345)
        eps, k = self.models.draw_prior_noise(cfg.n_samples, torch.device("cpu"), g)
        self.fixed_noise = (eps.to(self.device), None if k is None else k.to(self.device))
        if resume_state is None and self.models.prior is not None:
            self.models.prior.init_from(self.fixed_real)  # before EHM: DDP then broadcasts rank 0's
        from .ehm import EHM

        self.ehm = EHM(self.models, cfg, batch_source=self.loader)
        if resume_state is not None:
            self._restore(resume_state, resume_path)
        self.run_dir = _run_dir(cfg, resume_path, self.world_size)
        if resume_state is None and (self.run_dir / ckpt.CHECKPOINT_NAME).exists():
            raise ConfigError(f"run folder {str(self.run_dir)!r} already holds a checkpoint: continue it with --resume "
                              f"{self.run_dir}, or choose another --out")
        self.stop_code: int | None = None  # a signal number, or BROKEN_OUTPUT
        self.progress = Progress(cfg.steps, self.ehm.step_count, log_every=cfg.log_every, prog=PROG, enabled=self.main)

    def _sync_bn(self, models: EHMModels) -> EHMModels:
        """BatchNorm over the global batch when --sync-bn asks for it and it can run."""
        cfg = self.cfg
        if not cfg.sync_bn:
            return models
        if cfg.norm != "batch" or self.world_size == 1:
            if self.main:
                why = f"--norm is {cfg.norm}" if cfg.norm != "batch" else "there is one process"
                warnings.warn(f"--sync-bn has no effect: {why}", RuntimeWarning, stacklevel=2)
            return models
        if "bn_act" in levers_for(cfg.layer_levers, self.device.type):  # the fused op combines the statistics itself
            models.configure_layers(process_group=dist.group.WORLD)
            return models
        if self.device.type != "cuda":
            raise ConfigError("--sync-bn with the bn_act lever off needs CUDA devices (PyTorch's SyncBatchNorm runs on "
                              "GPUs only): on the CPU keep bn_act, use --norm layer, or BatchNorm per process")
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(models)

    def _restore(self, state: dict[str, Any], path: Path | None) -> None:
        try:
            self.ehm.load_state_dict(state["ehm"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ckpt.CheckpointError(
                f"checkpoint {str(path)!r} does not fit this configuration: {str(exc).splitlines()[0]}"
            ) from None
        data, saved = dict(state["data"]), int(state.get("world_size", 1))
        if saved != self.world_size:
            # Positions count global batches, and the random state is the same on every process
            # (noise is drawn for the global batch and sliced), so both carry over as they are.
            per_rank = self.cfg.batch_size // self.world_size
            if self.main:
                warnings.warn(
                    f"checkpoint {str(path)!r} was written by {saved} process(es), this run has {self.world_size}: "
                    f"the global batch ({self.cfg.batch_size}) and the data position carry over, each process now "
                    f"takes {per_rank} images of every batch, and every process resumes the saved random state; "
                    "the run matches an uninterrupted one up to floating-point summation order",
                    RuntimeWarning, stacklevel=2)
            same_batch = data.get("batch_size", 0) * data.get("world_size", 0) == self.cfg.batch_size
            if same_batch:  # ehm_fast.data loaders record the split: re-derive it (else they refuse)
                data.update(world_size=self.world_size, rank=self.rank, batch_size=per_rank)
        try:
            self.loader.load_state_dict(data)
        except (KeyError, ValueError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r}: its data position does not fit this run "
                                       f"({str(exc).splitlines()[0]}); resume with the same --data and --batch-size") from None
        ckpt.set_rng_state(state["rng"], self.device)  # last: building the models above drew random numbers

    # ------------------------------------------------------------------ outputs
    def payload(self) -> dict[str, Any]:
        return {
            "config": to_dict(self.cfg),
            "channels": self.channels,
            "ehm": self.ehm.state_dict(),
            "data": self.loader.state_dict(),
            "rng": ckpt.rng_state(self.device),
            "step": self.ehm.step_count,
            # bf16 autocast needs no loss scaling, so there is no GradScaler state to keep.
            "amp": {"enabled": self.ehm.amp, "dtype": "bfloat16", "grad_scaler": None},
            "world_size": self.world_size,
        }

    def save_checkpoint(self) -> Path | None:
        if not self.main:
            return None
        return ckpt.save(self.run_dir / ckpt.CHECKPOINT_NAME, self.payload())

    @torch.no_grad()
    def save_grids(self, tag: str) -> None:
        from .plots import save_grid, save_reconstructions

        m = self.models
        m.eval()
        try:
            samples = m.decoder(m.prior_latents(*self.fixed_noise))
            mu, _ = m.encoder(self.fixed_real.contiguous(memory_format=self.ehm.memory_format))
            recons = m.decoder(mu)
        finally:
            m.train()
        save_grid(samples, self.run_dir / f"samples_{tag}.png", nrow=int(math.sqrt(samples.shape[0])) or 1)
        save_reconstructions(self.fixed_real, recons, self.run_dir / f"reconstructions_{tag}.png", nrow=8,
                             labels=("input", "reconstruction"))
        if self.writer is not None:
            from .plots import grid_array

            self.writer.add_image("samples", grid_array(samples, 8), self.ehm.step_count, dataformats="HW" if samples.shape[1] == 1 else "HWC")

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        ehm = self.ehm
        self.writer = None
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._trim_metrics(ehm.step_count)
            self.writer = _tensorboard(self.run_dir / "tb")
            self.progress.message(self._announcement())
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            self.loader.close()
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.writer is not None:
                self.writer.close()
            self.progress.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_code = signum  # acted on at the end of the current step

    def _loop(self) -> dict[str, Any]:
        cfg, ehm = self.cfg, self.ehm
        images, t_last, t0, record = 0, time.perf_counter(), time.perf_counter(), {}
        start = ehm.step_count
        while ehm.step_count < cfg.steps and not self._stop_requested():
            n_batches = ehm.batches_needed()
            metrics = ehm.step(self.loader)
            images += n_batches * cfg.batch_size  # the global batch: images/s of the whole job
            s = ehm.step_count
            self.progress.step()
            if s % cfg.log_every == 0 or s == cfg.steps:
                now = time.perf_counter()
                record = self._log(s, metrics, images / max(now - t_last, 1e-9))
                images, t_last = 0, now
            if self.main and (s % cfg.sample_every == 0 or s == cfg.steps):
                self.save_grids(f"{s:06d}")
            if s % cfg.ckpt_every == 0 and s != cfg.steps:
                self.save_checkpoint()
        path = self.save_checkpoint()  # first: nothing written after it can cost it
        self.progress.close()
        wall = time.perf_counter() - t0
        summary = {"step": ehm.step_count, "steps_this_session": ehm.step_count - start, "seconds": round(wall, 2),
                   "world_size": self.world_size, "global_batch_size": cfg.batch_size,
                   "last": record, "checkpoint": str(path) if path else None,
                   "stopped_by": _stop_name(self.stop_code) if self.stop_code else None}
        if self.main:
            self._finish(summary)
        return summary

    def _stop_requested(self) -> bool:
        """A signal (or rank 0's broken stderr) on any process stops every process after the same
        step (no rank left waiting in a collective)."""
        if self.progress.broken and self.stop_code is None:
            self.stop_code = BROKEN_OUTPUT
        if self.world_size == 1:
            return self.stop_code is not None
        flag = torch.tensor([float(self.stop_code or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.stop_code is None:
            self.stop_code = int(flag.item())
        return bool(flag.item())

    def _global_mean(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metrics averaged over the processes (each computed them on its own slice)."""
        if self.world_size == 1:
            return metrics
        keys = sorted(metrics)
        flat = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])
        dist.all_reduce(flat)
        return dict(zip(keys, (flat / self.world_size).unbind()))

    def _log(self, step: int, metrics: dict[str, torch.Tensor], images_per_s: float) -> dict[str, Any]:
        metrics = self._global_mean(metrics)
        values = {k: float(v) for k, v in metrics.items()}  # the one host sync, at log steps only
        bad = values.get("bad_steps", 0.0)
        if bad > self.cfg.max_bad_steps:
            raise TrainingStopped(
                f"stopped at step {step}: {int(bad)} optimizer steps had non-finite losses or gradients (limit "
                f"--max-bad-steps {self.cfg.max_bad_steps}); the last checkpoint is kept. Try a lower --lr / --lr-critic "
                "or --gp-weight, or --estimator jensen"
            )
        record = {"step": step, "time": round(time.time(), 3), "images_per_s": round(images_per_s, 1), **values}
        util = _gpu_utilisation(self.device)
        if util is not None:
            record["gpu_util"] = util
        if self.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.writer is not None:
                for k, v in record.items():
                    if k not in ("step", "time") and math.isfinite(v):
                        self.writer.add_scalar(k, v, step)
            short = {"critic": values.get("critic_loss"), "gen": values.get("gen_loss"), "rec": values.get("rec_mse")}
            post = {k: f"{v:.4g}" for k, v in short.items() if v is not None}
            post["img/s"] = f"{images_per_s:.0f}"
            if util is not None:
                post["gpu%"] = util
            self.progress.show(step, post)
        return record

    def _trim_metrics(self, step: int) -> None:
        """On resume, drop records written after the checkpoint (that stretch is trained again)."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            from .plots import read_metrics

            kept = [r for r in read_metrics(path) if r["step"] <= step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def _announcement(self) -> str:
        e, n = self.ehm, sum(p.numel() for p in self.models.parameters())
        return (f"{self.cfg.objective} on {self.cfg.data} ({self.cfg.image_size}px, {self.channels} channel(s)), "
                f"{n / 1e6:.2f}M parameters, device {self.device} (amp={e.amp}, channels_last={e.channels_last}, "
                f"cuda_graph={e.cuda_graph}, image_layers={self.cfg.image_layers}, conv_kernel={self.cfg.conv_kernel}, "
                f"layer levers={','.join(sorted(e.layers.levers)) or 'none'}), {self._parallelism()}, "
                f"run folder {self.run_dir}")

    def _parallelism(self) -> str:
        w, b = self.world_size, self.cfg.batch_size
        if w == 1:
            return f"batch {b}"
        return f"DDP over {w} processes ({self.backend}), global batch {b} = {w} x {b // w}"

    def _finish(self, summary: dict[str, Any]) -> None:
        """The final grids, loss.png and summary.json, then one line naming what is in the folder."""
        from .plots import read_metrics, save_loss_plot

        written = []
        if self.ehm.step_count > 0:
            self.save_grids("final")
            written.append("samples_final.png, reconstructions_final.png")
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            save_loss_plot(read_metrics(metrics), self.run_dir / "loss.png", critic_weight=self.cfg.critic_weight)
            written.append("loss.png, metrics.jsonl")
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        written.append("summary.json")
        if summary["stopped_by"]:
            how = f"stopped by {summary['stopped_by']}"
        elif summary["steps_this_session"] == 0:
            how = f"nothing to train (--steps {self.cfg.steps})"
        else:
            how = "done"
        self.progress.message(f"{how} at step {summary['step']}; checkpoint {summary['checkpoint']}; "
                              f"{', '.join(written)} in {self.run_dir}")


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed: no TensorBoard events (metrics.jsonl is still written)", stacklevel=2)
        return None
    return SummaryWriter(str(path))


def _gpu_utilisation(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.utilization(device))
    except Exception:  # needs pynvml / NVML; absent on some machines
        return None
