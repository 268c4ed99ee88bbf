"""Run configuration: dataclasses with a help text per option, YAML/TOML files, flag overrides.

Precedence: the dataclass defaults, then the file given by `--config`, then command-line flags.
Every option is a field of `TrainConfig` (those of the training step come from `EHMConfig`), so
files and flags share one name per option (`n_critic` in a file, `--n-critic` on the line).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .nn.options import CONV_KERNELS, IMAGE_LAYERS, LEVER_HELP, levers_for

OBJECTIVES = ("ehm", "svae", "vae", "wgan-gp")
ESTIMATORS = ("importance", "jensen", "ais")
SCHEDULES = ("constant", "wgan")
LIPSCHITZ = ("gp", "clip", "none")
SLEEP_LATENT = ("nll", "kl")
OPTIMIZERS = ("adam", "svrg", "storm")
VR_REFERENCES = ("joint", "own")


class ConfigError(ValueError):
    """A bad configuration value or key; the CLI prints it as one line and exits with code 2."""


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class EHMConfig:
    """Options of the training step (`ehm_fast.EHM`)."""

    objective: str = opt("ehm", "what the encoder/decoder minimise: ehm (wake + sleep cross-entropies), svae "
                         "(symmetric VAE), vae (ELBO, no critic), wgan-gp (decoder trained by the critic alone)", OBJECTIVES)
    estimator: str = opt("jensen", "critic's log-partition estimate: importance (logsumexp of f(x~) - log p(x~|z), "
                         "x~ sampled with the decoder noise), jensen (its lower bound, WGAN's mean f(x~)), or ais "
                         "(annealed importance sampling from p(x|z) to exp(f) with MALA moves: docs/sampling.md)",
                         ESTIMATORS)
    ais_steps: int = opt(4, "ais: annealing steps K (one MALA move and one critic evaluation each)")
    ais_step_size: float = opt(0.1, "ais: MALA step size as a fraction of the decoder's variance s^2")
    n_critic: int = opt(2, "critic steps per generator step (the WGAN-GP paper uses 5)")
    critic_schedule: str = opt("constant", "constant n_critic, or wgan: 100 critic steps for the first 25 generator "
                               "steps and every 500th", SCHEDULES)
    lipschitz: str = opt("gp", "how the critic is kept Lipschitz: gp (gradient penalty), clip (weight clipping), none",
                         LIPSCHITZ)
    gp_weight: float = opt(10.0, "gradient penalty weight lambda")
    gp_eps: float = opt(1e-8, "epsilon inside the gradient norm sqrt(|g|^2 + eps) (no NaN at a zero gradient)")
    clip_value: float = opt(0.01, "weight clipping bound c (lipschitz=clip)")
    sleep_latent: str = opt("nll", "sleep-phase latent loss: nll (-log q(z|x~)) or kl (closed-form KL between "
                            "N(z, t^2 I) and q(z|x~))", SLEEP_LATENT)
    sleep_code_noise: float = opt(0.1, "t, the standard deviation around the sleep-phase code (sleep_latent=kl)")
    sleep_noise: bool = opt(False, "sample x~ = G(z) + s*eps in the sleep phase instead of taking the mean G(z)")
    sleep_decoder_grad: bool = opt(True, "let sleep-phase gradients flow into the decoder through x~")
    critic_weight: float = opt(100.0, "weight w of -f(x~) in the sleep loss (1 is the literal EHM objective; a larger w "
                               "lets the critic compete with the reconstruction gradient, ~1/s^2 larger)")
    likelihood: str = opt("gaussian", "decoder likelihood p(x|z)", ("gaussian", "laplace", "bernoulli"))
    log_scale: float = opt(math.log(0.1), "initial log standard deviation (gaussian) or log scale (laplace) "
                           "(default: log 0.1 = -2.303)")
    learn_scale: bool = opt(True, "learn the decoder's log_scale (else it stays fixed)")
    optimizer: str = opt("adam", "adam (torch's fused Adam), or svrg / storm from ehm_fast.optim", OPTIMIZERS)
    snapshot_every: int = opt(100, "svrg: optimizer steps between snapshots (full-gradient estimates)")
    snapshot_batches: int = opt(16, "svrg: batches averaged into each snapshot's mean gradient (drawn from the "
                                "training data; with several processes, per process)")
    vr_reference: str = opt("joint", "svrg / storm: the reference point of each player's control variate: joint (the "
                            "snapshot, or STORM's previous step, holds both players' weights, as SVRE does: an "
                            "unbiased estimate of the current gradient) or own (only the player's own weights; the "
                            "other player's are current, so the correction is biased by the other's moves)",
                            VR_REFERENCES)
    lr: float = opt(2e-4, "learning rate of the encoder and decoder")
    lr_critic: float = opt(2e-4, "learning rate of the critic")
    betas: tuple[float, float] = opt((0.5, 0.9), "Adam betas (both optimizers)")
    backend: str = opt("auto", "ehm_fast.losses backend: auto (fused kernels), torch (plain-PyTorch reference), cpu, "
                       "cuda, triton", ("auto", "torch", "cpu", "cuda", "triton"))
    amp: bool | None = opt(None, "bf16 autocast (default: on on a GPU with bf16, off on the CPU)")
    channels_last: bool | None = opt(None, "channels_last memory format (default: on on a GPU)")
    cuda_graph: bool | None = opt(None, "capture each iteration in a CUDA graph (default: on on a GPU with one "
                                  "process)")
    image_layers: str = opt("cudnn", "the layers that read and write images (3 channels): cudnn convolutions, or "
                            "matmul (im2col + one matmul: the same sums)", IMAGE_LAYERS)
    compile: bool = opt(False, "compile the critic and generator loss closures with torch.compile (Inductor); with "
                        "lipschitz gp it needs the explicit_penalty layer lever (Inductor refuses a double backward)")
    conv_kernel: str = opt("cudnn", "the kernels of ehm_fast.nn's convolutions: cudnn, or triton (ehm_fast's own implicit-GEMM "
                           "kernels, kernels/conv.py: the same sums)", CONV_KERNELS)
    layer_levers: str = opt("auto", "the exact layer speedups of ehm_fast.nn in force: auto (all on a GPU, none on "
                            "the CPU), all, none, a comma list, or -name,... for all but those; " + "; ".join(f"{k}: {v}" for k, v in LEVER_HELP.items()))
    local_log_partition: bool = opt(False, "with several processes, estimate the importance log-partition over each "
                                    "process's own samples instead of the samples of all processes")
    max_bad_steps: int = opt(50, "stop after this many steps skipped for non-finite losses or gradients")


@dataclass
class TrainConfig(EHMConfig):
    """Everything a run needs; saved in every checkpoint."""

    data: str = opt("digits", "data source: digits (scikit-learn's 8x8 digits, upsampled), shards:DIR (prepared by "
                    "ehm-prepare: the fast path), or lsun:PATH, folder:PATH, zip:PATH (decoded while training)")
    image_size: int = opt(32, "image side in pixels (32, 64 or 128)", (32, 64, 128))
    batch_size: int = opt(64, "images per batch (across all devices)")
    steps: int = opt(1000, "generator steps to train")
    seed: int = opt(0, "random seed")
    device: str = opt("auto", "auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    z_dim: int = opt(32, "latent code size")
    width: int = opt(32, "channels of the first encoder level (doubled per level, capped at 8x); the decoder mirrors it")
    critic_width: int = opt(32, "channels of the critic's first level")
    norm: str = opt("layer", "encoder/decoder normalisation", ("batch", "layer", "none"))
    critic_norm: str = opt("none", "critic normalisation (no BatchNorm under a gradient penalty)", ("layer", "none"))
    share_weights: bool = opt(False, "decoder uses the encoder's conv weights, transposed")
    scale_shape: str = opt("scalar", "log_scale per image (scalar) or per channel", ("scalar", "channel"))
    prior: str = opt("normal", "p(z): normal N(0, I) or vamp (VampPrior)", ("normal", "vamp"))
    vamp_components: int = opt(32, "pseudo-inputs K of the VampPrior")
    sync_bn: bool = opt(False, "with several processes, BatchNorm statistics over the global batch (SyncBatchNorm; "
                        "CUDA only)")
    out: str | None = opt(None, "run folder (default: runs/<timestamp>, or the folder of the checkpoint given to --resume)")
    log_every: int = opt(10, "steps between metrics.jsonl/TensorBoard records and progress-bar updates (in a "
                        "file or pipe, a plain progress line about every 5%% of the run)")
    sample_every: int = opt(250, "steps between sample and reconstruction grids")
    ckpt_every: int = opt(500, "steps between checkpoints (one is also written at the end and on SIGINT/SIGTERM)")
    n_samples: int = opt(64, "images per sample grid")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> Any:
    """int for `int | None`, etc."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0]
    return hint


def _coerce(name: str, value: Any, hint: Any, choices: tuple | None) -> Any:
    optional = type(None) in typing.get_args(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {name!r} cannot be empty")
    base = _base_type(hint)
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
                value = value.lower() in ("true", "yes", "1", "on")
            if not isinstance(value, bool):
                raise TypeError
        elif typing.get_origin(base) is tuple:
            items = [float(v) for v in value]
            if len(items) != len(typing.get_args(base)):
                raise TypeError
            value = tuple(items)
        elif base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            value = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise TypeError
            value = float(value)
        else:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r} must be {getattr(base, '__name__', base)}, got {value!r}") from None
    if choices and value not in choices:
        raise ConfigError(f"config key {name!r} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def apply_overrides(config: TrainConfig, values: dict[str, Any], where: str) -> TrainConfig:
    """A copy of `config` with `values` set; unknown keys and bad values raise ConfigError."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = _hints(type(config))
    clean = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown config key {key!r}{hint}")
        clean[name] = _coerce(name, value, hints[name], fields[name].metadata.get("choices"))
    return validate(dataclasses.replace(config, **clean))


def check_compile(config: EHMConfig, levers: frozenset[str]) -> None:
    """compile with the gradient penalty needs its explicit first-order form."""
    critic = config.objective != "vae"
    if config.compile and critic and config.lipschitz == "gp" and "explicit_penalty" not in levers:
        raise ConfigError("compile with lipschitz gp needs the explicit_penalty layer lever (e.g. --layer-levers "
                          "all,explicit_penalty): torch.compile cannot differentiate the penalty twice")


def validate(config: TrainConfig) -> TrainConfig:
    positive = ("n_critic", "batch_size", "z_dim", "width", "critic_width", "log_every", "sample_every", "ckpt_every",
                "n_samples", "vamp_components", "max_bad_steps",
                "snapshot_every", "snapshot_batches", "ais_steps")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.steps < 0:
        raise ConfigError(f"steps must be >= 0, got {config.steps}")
    if config.estimator == "ais" and config.likelihood == "bernoulli" and config.objective != "wgan-gp":
        raise ConfigError("estimator ais moves x~ by Langevin steps, which needs a continuous likelihood: use "
                          "gaussian or laplace, or another estimator")
    for name in ("lr", "lr_critic", "gp_weight", "clip_value", "gp_eps", "sleep_code_noise", "ais_step_size"):
        if not getattr(config, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(config, name)}")
    try:
        levers = levers_for(config.layer_levers, "cpu")
    except ValueError as exc:
        raise ConfigError(f"layer_levers: {exc}") from None
    check_compile(config, levers)
    return config


def load_file(path: str | Path) -> dict[str, Any]:
    """The key/value mapping of a .yaml/.yml or .toml config file (nested tables are flattened)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror or exc}") from None
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file {str(p)!r} must end in .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as exc:  # parse errors of either format
        raise ConfigError(f"cannot parse config file {str(p)!r}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        # Sections ([model], [critic], ...) only group keys; the names stay flat and unique.
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def add_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig) -> None:
    """One flag per field; defaults are SUPPRESSed so only the flags given override the file."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        base = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else None
        text = meta.get("help", "")
        if "(default" not in text:  # a help text may say its default better than repr does
            text += f" (default: {'auto' if default is None else default})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text, "dest": f.name}
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) is tuple:
            parser.add_argument(flag, nargs=len(typing.get_args(base)), type=float, metavar="X", **kwargs)
        else:
            choices = meta.get("choices")
            parser.add_argument(flag, type=base, choices=choices, metavar=None if choices else f.name.upper(), **kwargs)


def to_dict(config: EHMConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by `to_dict` (keys unknown to this version are ignored)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names}
    return TrainConfig(**known)
