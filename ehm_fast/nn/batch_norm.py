"""Batch norm + activation as one op, act(batch_norm(x + input_bias)): the `bn_act` layer lever.

A BatchNorm2d followed by an activation, after a transposed conv's bias add, costs PyTorch four
passes over the activation in the forward and saves two tensors of its size. The Triton path reads
x twice in the forward (statistics; then bias + normalise + affine + activation) and twice in the
backward (two per-channel sums; then gx), and saves only x and two [C] vectors: the activation's
derivative is recomputed from x. The reference ("torch", the oracle and the CPU path) is the same
formulas in plain torch under autograd.

Statistics are fp32 (fp64 for fp64 x) whatever x's dtype. The running statistics are updated in
place by tensor ops only: no host sync, so a CUDA graph can capture the op. With a process group
of several ranks the per-rank (count, mean, M2) are gathered and merged, and the backward
all-reduces its two per-channel sums: SyncBatchNorm's semantics, so x's gradient is that of one
process on the whole batch and the parameters' gradients are per-rank sums for DDP to average.
"""

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

from .._backend import resolve_layer
from ..ops.contract import acc_dtype
from ..ops.eager import eager, eager_op

ACTIVATIONS = ("linear", "relu", "lrelu")


def _kernels() -> Any:
    """The Triton kernels, imported on first use: the reference path must not need triton."""
    from ehm_fast.kernels import batch_norm

    return batch_norm


def _per_channel(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).view(1, -1, 1, 1)


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[1]


# ---------------------------------------------------------------- the Triton path's custom ops


def _stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, M2) of x; no autograd: the fused backward differentiates through them."""
    return tuple(_kernels().bn_stats(x))


bn_stats_op = torch.library.custom_op("ehm_fast::bn_stats", _stats, mutates_args=())


@bn_stats_op.register_fake
def _(x):
    acc = acc_dtype(x.dtype)
    return x.new_empty(x.shape[1], dtype=acc), x.new_empty(x.shape[1], dtype=acc)


def _fwd(
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    input_bias: Optional[Tensor],
    count: Optional[Tensor],
    group_name: Optional[str],
    batch_stats: bool,
    activation: str,
    slope: float,
) -> Tensor:
    """act((x + input_bias - mean) * rstd * weight + bias). The backward reads the rest: whether
    mean and rstd are x's own statistics, over how many values (None: x's rows) and ranks."""
    return _kernels().bn_act_fwd(x, mean, rstd, weight, bias, input_bias, ACTIVATIONS.index(activation), slope)


bn_act_op = torch.library.custom_op("ehm_fast::bn_act", _fwd, mutates_args=())


@bn_act_op.register_fake
def _(x, mean, rstd, weight, bias, input_bias, count, group_name, batch_stats, activation, slope):
    return torch.empty_like(x)


def _bwd_sums(
    gy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    input_bias: Optional[Tensor],
    activation: str,
    slope: float,
) -> Tensor:
    """[3, C]: this rank's sum(gz), sum(gz * xhat), sum(xhat), gz = gy * act'."""
    return _kernels().bn_act_bwd_sums(gy, x, mean, rstd, weight, bias, input_bias, ACTIVATIONS.index(activation),
                                      slope)


bn_act_bwd_sums_op = torch.library.custom_op("ehm_fast::bn_act_bwd_sums", _bwd_sums, mutates_args=())


@bn_act_bwd_sums_op.register_fake
def _(gy, x, mean, rstd, weight, bias, input_bias, activation, slope):
    return x.new_empty(3, x.shape[1], dtype=rstd.dtype)


def _bwd_dx(
    gy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    input_bias: Optional[Tensor],
    coef: Optional[Tensor],
    activation: str,
    slope: float,
) -> Tensor:
    """x's gradient; coef [2, C] holds the batch means of gz and gz * xhat (None: running stats)."""
    return _kernels().bn_act_bwd_dx(gy, x, mean, rstd, weight, bias, input_bias, coef,
                                    ACTIVATIONS.index(activation), slope)


bn_act_bwd_dx_op = torch.library.custom_op("ehm_fast::bn_act_bwd_dx", _bwd_dx, mutates_args=())


@bn_act_bwd_dx_op.register_fake
def _(gy, x, mean, rstd, weight, bias, input_bias, coef, activation, slope):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, mean, rstd, weight, bias, input_bias, count, group_name, batch_stats, activation, slope = inputs
    ctx.save_for_backward(x, mean, rstd, weight, bias, input_bias, count)
    ctx.group_name, ctx.batch_stats, ctx.activation, ctx.slope = group_name, batch_stats, activation, slope


def _batch_means(sums: Tensor, count: Tensor | int, group_name: Optional[str]) -> Tensor:
    """(mean of gz, mean of gz * xhat) over the whole batch: every rank's sums when synchronised."""
    if group_name is not None:
        sums = sums.clone()  # this rank's own sums stay the parameters' gradients
        dist.all_reduce(sums, group=_resolve_process_group(group_name))
    return sums / count


def _backward(ctx, gy):
    x, mean, rstd, weight, bias, input_bias, count = ctx.saved_tensors
    need_x, need_w, need_b, need_ib = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
    sums_fn, dx_fn = (_bwd_sums, _bwd_dx) if eager(ctx) else (bn_act_bwd_sums_op, bn_act_bwd_dx_op)
    sums = sums_fn(gy, x, mean, rstd, weight, bias, input_bias, ctx.activation, ctx.slope)
    s_gz, s_gzx, s_xhat = sums
    rows = _rows(x)
    coef = None
    if ctx.batch_stats and (need_x or need_ib):
        coef = _batch_means(sums[:2], rows if count is None else count, ctx.group_name)
    gx = dx_fn(gy, x, mean, rstd, weight, bias, input_bias, coef, ctx.activation, ctx.slope) if need_x else None
    g_ib = None
    if need_ib:  # the sum of gx over this rank's rows, from the sums (zero on one process in training)
        own = s_gz if coef is None else s_gz - rows * coef[0] - s_xhat * coef[1]
        g_ib = (own * (rstd if weight is None else rstd * weight)).to(input_bias.dtype)
    gw = s_gzx.to(weight.dtype) if need_w else None
    gb = s_gz.to(bias.dtype) if need_b else None
    return gx, None, None, gw, gb, g_ib, None, None, None, None, None


bn_act_op.register_autograd(_backward, setup_context=_setup_context)
_bn_act_fused = eager_op(bn_act_op, _fwd, _setup_context, _backward)


# ---------------------------------------------------------------- statistics, shared by both paths


def _merge_ranks(rows: int, mean: Tensor, m2: Tensor, group: Any) -> Tuple[Tensor, Tensor, Tensor]:
    """Every rank's (count, mean, M2) merged by Chan's formula: any per-rank batch sizes, no
    cancellation (only deviations of rank means from the global mean are squared). The gather is
    differentiable: the reference path's gradient reaches every rank's statistics."""
    from torch.distributed.nn.functional import all_gather

    c = mean.shape[0]
    parts = torch.stack(all_gather(torch.cat([mean.new_full((1,), rows), mean, m2]), group=group))
    counts, means, m2s = parts[:, :1], parts[:, 1:c + 1], parts[:, c + 1:]
    count = counts.sum()
    mean = (counts * means).sum(0) / count
    return count, mean, m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)


def _batch_moments(rows: int, mean: Tensor, m2: Tensor, group: Any) -> Tuple[Tensor | int, Tensor, Tensor]:
    """(count, mean, biased variance) over the batch of every rank of `group` (None: this one)."""
    if group is not None:
        rows, mean, m2 = _merge_ranks(rows, mean, m2, group)
    return rows, mean, m2 / rows


@torch.no_grad()
def _update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: Tensor | int,
                    momentum: Optional[float], num_batches_tracked: Optional[Tensor]) -> None:
    """nn.BatchNorm2d's update in place (momentum None: the cumulative average), with the unbiased
    variance of the global batch."""
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
        momentum = num_batches_tracked.to(running_mean.dtype).reciprocal()
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype) * momentum)
    unbiased = var * (count / (count - 1))
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype) * momentum)


def _activate(t: Tensor, activation: str, slope: float) -> Tensor:
    if activation == "relu":
        return F.relu(t)
    if activation == "lrelu":
        return F.leaky_relu(t, slope)
    return t


def _reference(x: Tensor, weight, bias, running_mean, running_var, input_bias, training: bool, momentum, eps: float,
               activation: str, slope: float, group: Any, num_batches_tracked) -> Tensor:
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    if input_bias is not None:
        xf = xf + _per_channel(input_bias, acc)
    if training:
        var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        count, mean, var = _batch_moments(_rows(x), mean, var * _rows(x), group)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    pre = (xf - _per_channel(mean, acc)) * _per_channel(torch.rsqrt(var + eps), acc)
    if weight is not None:
        pre = pre * _per_channel(weight, acc)
    if bias is not None:
        pre = pre + _per_channel(bias, acc)
    return _activate(pre, activation, slope).to(x.dtype)


def _fused(x: Tensor, weight, bias, running_mean, running_var, input_bias, training: bool, momentum, eps: float,
           activation: str, slope: float, group: Any, num_batches_tracked) -> Tensor:
    acc = acc_dtype(x.dtype)
    count = None
    if training:
        stats = bn_stats_op if torch.compiler.is_compiling() else _stats
        n, mean, var = _batch_moments(_rows(x), *stats(x.detach()), group)
        if input_bias is not None:  # the statistics are x's; x + input_bias has the same variance
            mean = mean + input_bias.detach().to(acc)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, n, momentum, num_batches_tracked)
        count = None if group is None else n
    else:  # a copy: the running mean may be updated in place before this backward runs
        mean, var = running_mean.to(acc, copy=True), running_var.to(acc)
    rstd = torch.rsqrt(var + eps)
    group_name = None if group is None else group.group_name
    return _bn_act_fused(x, mean, rstd, weight, bias, input_bias, count, group_name, training, activation, slope)


# ---------------------------------------------------------------- the public API


def _sync_group(process_group: Any) -> Any:
    """The group to synchronise statistics over, None for a single rank."""
    if process_group is None or dist.get_world_size(process_group) == 1:
        return None
    return process_group


def _check(x: Tensor, activation: str, training: bool, group: Any, running_mean: Optional[Tensor],
           running_var: Optional[Tensor], **per_channel: Optional[Tensor]) -> None:
    if x.dim() != 4:
        raise ValueError(f"batch norm expects x of shape [N, C, H, W], got {x.dim()} dimensions")
    if not x.is_floating_point():
        raise ValueError(f"batch norm takes floating-point x, got {x.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    per_channel.update(running_mean=running_mean, running_var=running_var)
    for name, t in per_channel.items():
        if t is not None and t.numel() != x.shape[1]:
            raise ValueError(f"{name} has {t.numel()} entries but x has {x.shape[1]} channels")
    if (running_mean is None) != (running_var is None):
        raise ValueError("give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("eval mode (training=False) normalises with running_mean and running_var: give them")
    if training and group is None and _rows(x) <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")


def batch_norm_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool,
    momentum: float | None,
    eps: float,
    activation: str = "linear",
    slope: float = 0.2,
    input_bias: Tensor | None = None,
    process_group: Any = None,
    backend: str | None = None,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """act(F.batch_norm(x + input_bias, running_mean, running_var, weight, bias, training,
    momentum, eps)) in x's dtype and memory format, fused so the activation and the preceding
    layer's bias cost no pass of their own. momentum=None is the cumulative average over the
    num_batches_tracked batches (already counting this one, as nn.BatchNorm2d increments it first).
    process_group: the ranks whose batches share statistics (SyncBatchNorm)."""
    group = _sync_group(process_group)
    _check(x, activation, training, group, running_mean, running_var, weight=weight, bias=bias,
           input_bias=input_bias)
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    run = _reference if resolve_layer(backend, x.device) == "torch" else _fused
    return run(x, weight, bias, running_mean, running_var, input_bias, training, momentum, eps, activation, slope,
               group, num_batches_tracked)


def bn_act(
    module: torch.nn.BatchNorm2d,
    x: Tensor,
    activation: str = "linear",
    slope: float = 0.2,
    input_bias: Tensor | None = None,
    *,
    backend: str | None = None,
    process_group: Any = None,
) -> Tensor:
    """act(module(x + input_bias)) as nn.BatchNorm2d.forward computes it (batch or running
    statistics, buffer updates), fused: the models keep their modules and state_dicts."""
    use_running = not module.training or module.track_running_stats
    running_mean = module.running_mean if use_running else None
    running_var = module.running_var if use_running else None
    training = module.training or running_mean is None
    _check(x, activation, training, _sync_group(process_group), running_mean, running_var, weight=module.weight,
           bias=module.bias, input_bias=input_bias)  # before the counter moves
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
    return batch_norm_act(x, module.weight, module.bias, running_mean, running_var, training=training,
                          momentum=module.momentum, eps=module.eps, activation=activation, slope=slope,
                          input_bias=input_bias, process_group=process_group, backend=backend,
                          num_batches_tracked=module.num_batches_tracked)
