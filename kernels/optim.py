"""Triton kernels of the control-variate optimizer updates (same signatures as ehm_fast._C's).

One launch per bucket: the addresses of every tensor list travel in one int64 table on the
device (cast with tl.pointer_type in the kernel), beside a work list of (tensor, chunk start)
pairs, one program per chunk; the double-precision scalars ride in the same table as bit
patterns, so one host-to-device copy (from pinned memory, asynchronous) sets up the whole step.
Square roots and divisions are IEEE-rounded (sqrt_rn, div_rn) to stay at torch.optim's rounding.

Device-side step control, so that a step needs no host synchronisation and can be captured in a
CUDA graph: Adam's step counts may be tensors (an eighth pointer row; the bias corrections are
then computed in the kernel, in double), and a `found_inf` flag makes every program return
without touching memory. A table built while a CUDA graph is being captured stays alive, since
every replay of the graph copies it again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ehm_fast.ops.contract import acc_dtype

from ._dtypes import TL_TYPES, tl_acc

CHUNK = 1 << 16  # elements per work-list entry, as csrc/optim.h's kOptimChunk
SUB = 1 << 12  # elements per program: a chunk is split over CHUNK // SUB programs (grid axis 1)
BLOCK = 1024
LISTS = 8  # param, grad, ref_grad, anchor, state1, state2, direction, step count

Tensors = Sequence[torch.Tensor]  # an empty one: that list is absent


def optim_chunk_size() -> int:
    return CHUNK


@triton.jit
def _ptr(TABLE, k, t, n, TY: tl.constexpr):
    return tl.load(TABLE + k * n + t).to(tl.pointer_type(TY))


@triton.jit
def _scalar(TABLE, k, ACC: tl.constexpr):
    return tl.load(TABLE + k).to(tl.float64, bitcast=True).to(ACC)


@triton.jit
def _locate(TABLE, SIZES, WORK_T, WORK_S, FOUND, n, CHUNK: tl.constexpr, SPLIT: tl.constexpr, P_TY: tl.constexpr,
            ACC: tl.constexpr, HAS_FOUND: tl.constexpr):
    """This program's range [begin, end) (its SUB-slice of a chunk, empty where found_inf is set),
    its tensor's index and the 7 typed pointers of that tensor (param, grad, ref_grad, anchor,
    state1, state2, direction). Many small programs, not one per chunk: enough of them in flight
    to keep the memory system busy."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(WORK_T + pid)
    chunk_begin = tl.load(WORK_S + pid)
    begin = chunk_begin + tl.program_id(1).to(tl.int64) * (CHUNK // SPLIT)
    end = tl.minimum(tl.minimum(tl.load(SIZES + t), chunk_begin + CHUNK), begin + CHUNK // SPLIT)
    begin = tl.minimum(begin, end)
    if HAS_FOUND:
        end = tl.where(tl.load(FOUND) != 0, begin, end)
    return (begin, end, t, _ptr(TABLE, 0, t, n, P_TY), _ptr(TABLE, 1, t, n, P_TY), _ptr(TABLE, 2, t, n, P_TY),
            _ptr(TABLE, 3, t, n, ACC), _ptr(TABLE, 4, t, n, ACC), _ptr(TABLE, 5, t, n, ACC),
            _ptr(TABLE, 6, t, n, ACC))


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    # if/else, not an early return: the compiler still type-checks the code after a return
    # (sqrt_rn rejects fp64), the interpreter does not
    if F64:
        r = tl.sqrt(x)  # IEEE-rounded for fp64
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _to_param(x, P_TY: tl.constexpr, BF16: tl.constexpr):
    """Rounds to the parameter dtype; bf16 by integer round-to-nearest-even (as c10 does), since the
    interpreter's float-to-bf16 cast truncates."""
    if BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        out = tl.where(x != x, x.to(tl.bfloat16), rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True))
    else:
        out = x.to(P_TY)
    return out


@triton.jit
def _div(a, b, F64: tl.constexpr):
    if F64:
        r = a / b
    else:
        r = tl.div_rn(a, b)
    return r


@triton.jit
def _load_block(P, G, GR, AN, D, off, end, alpha, HAS_CV: tl.constexpr, HAS_DIR: tl.constexpr, ACC: tl.constexpr,
                BLOCK: tl.constexpr):
    """(idx, mask, param, v) of one block; v = (g - alpha g_ref) + alpha anchor (exactly g without a
    control variate, exactly the anchor when g == g_ref and alpha == 1), stored to D if HAS_DIR."""
    idx = off + tl.arange(0, BLOCK)
    mask = idx < end
    param = tl.load(P + idx, mask=mask, other=0.0).to(ACC)
    d = tl.load(G + idx, mask=mask, other=0.0).to(ACC)
    if HAS_CV:
        gr = tl.load(GR + idx, mask=mask, other=0.0).to(ACC)
        an = tl.load(AN + idx, mask=mask, other=0.0).to(ACC)
        d = (d - alpha * gr) + alpha * an
    if HAS_DIR:
        tl.store(D + idx, d, mask=mask)
    return idx, mask, param, d


@triton.jit
def _cv_adam_kernel(TABLE, SCALARS, SIZES, WORK_T, WORK_S, FOUND, n, CHUNK: tl.constexpr, SPLIT: tl.constexpr,
                    F64: tl.constexpr,
                    BF16: tl.constexpr, P_TY: tl.constexpr, ACC: tl.constexpr, HAS_CV: tl.constexpr,
                    HAS_DIR: tl.constexpr, DECOUPLED: tl.constexpr, HAS_WD: tl.constexpr, HAS_FOUND: tl.constexpr,
                    DEVICE_STEP: tl.constexpr, BLOCK: tl.constexpr):
    begin, end, t, p_ptr, g_ptr, gr_ptr, an_ptr, m_ptr, v_ptr, d_ptr = _locate(
        TABLE, SIZES, WORK_T, WORK_S, FOUND, n, CHUNK, SPLIT, P_TY, ACC, HAS_FOUND)
    alpha = _scalar(SCALARS, 0, ACC)
    w1 = _scalar(SCALARS, 1, ACC)  # 1 - beta1
    beta2 = _scalar(SCALARS, 2, ACC)
    w2 = _scalar(SCALARS, 3, ACC)  # 1 - beta2
    eps = _scalar(SCALARS, 4, ACC)
    wd = _scalar(SCALARS, 5, ACC)
    decay = _scalar(SCALARS, 6, ACC)  # 1 - lr * weight_decay
    if DEVICE_STEP:  # as torch.optim.Adam: 1 - beta^t in double, from this tensor's count t
        count = tl.load(_ptr(TABLE, 7, t, n, tl.float32)).to(tl.float64)
        bc1 = 1.0 - tl.exp2(count * _scalar(SCALARS, 9, tl.float64))  # log2(beta1)
        neg_step = (-_scalar(SCALARS, 11, tl.float64) / bc1).to(ACC)  # lr
        bc2 = tl.sqrt(1.0 - tl.exp2(count * _scalar(SCALARS, 10, tl.float64))).to(ACC)  # log2(beta2)
    else:
        neg_step = _scalar(SCALARS, 7, ACC)  # -lr / (1 - beta1^step)
        bc2 = _scalar(SCALARS, 8, ACC)  # sqrt(1 - beta2^step)
    for off in range(begin, end, BLOCK):
        idx, mask, param, d = _load_block(p_ptr, g_ptr, gr_ptr, an_ptr, d_ptr, off, end, alpha, HAS_CV, HAS_DIR, ACC,
                                          BLOCK)
        if HAS_WD:
            if DECOUPLED:
                param = param * decay
            else:
                d = d + wd * param
        m = tl.load(m_ptr + idx, mask=mask, other=0.0)
        m = tl.where(w1 < 0.5, m + w1 * (d - m), d - (d - m) * (1.0 - w1))
        v = tl.load(v_ptr + idx, mask=mask, other=0.0) * beta2 + w2 * d * d
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)
        denom = _div(_sqrt(v, F64), bc2, F64) + eps
        param = param + _div(neg_step * m, denom, F64)
        tl.store(p_ptr + idx, _to_param(param, P_TY, BF16), mask=mask)


@triton.jit
def _cv_sgd_kernel(TABLE, SCALARS, SIZES, WORK_T, WORK_S, FOUND, n, CHUNK: tl.constexpr, SPLIT: tl.constexpr,
                   F64: tl.constexpr,
                   BF16: tl.constexpr, P_TY: tl.constexpr, ACC: tl.constexpr, HAS_CV: tl.constexpr,
                   HAS_DIR: tl.constexpr, HAS_BUF: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
                   HAS_WD: tl.constexpr, HAS_FOUND: tl.constexpr, BLOCK: tl.constexpr):
    begin, end, _, p_ptr, g_ptr, gr_ptr, an_ptr, b_ptr, _, d_ptr = _locate(
        TABLE, SIZES, WORK_T, WORK_S, FOUND, n, CHUNK, SPLIT, P_TY, ACC, HAS_FOUND)
    alpha = _scalar(SCALARS, 0, ACC)
    neg_lr = _scalar(SCALARS, 1, ACC)
    mom = _scalar(SCALARS, 2, ACC)
    keep = _scalar(SCALARS, 3, ACC)  # 1 - dampening
    wd = _scalar(SCALARS, 4, ACC)
    for off in range(begin, end, BLOCK):
        idx, mask, param, d = _load_block(p_ptr, g_ptr, gr_ptr, an_ptr, d_ptr, off, end, alpha, HAS_CV, HAS_DIR, ACC,
                                          BLOCK)
        if HAS_WD:
            d = d + wd * param
        if HAS_BUF:
            if FIRST:
                b = d
            else:
                b = tl.load(b_ptr + idx, mask=mask, other=0.0) * mom + keep * d
            tl.store(b_ptr + idx, b, mask=mask)
            if NESTEROV:
                d = d + mom * b
            else:
                d = b
        tl.store(p_ptr + idx, _to_param(param + neg_lr * d, P_TY, BF16), mask=mask)


_CAPTURED_TABLES: list[torch.Tensor] = []  # host tables that captured CUDA graphs copy on every replay


def _device_table(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return host.to(device)
    pinned = host.pin_memory()
    if torch.cuda.is_current_stream_capturing():
        _CAPTURED_TABLES.append(pinned)
    return pinned.to(device, non_blocking=True)


def _launch(kernel, lists: list[list[torch.Tensor]], scalars: list[float], found_inf: torch.Tensor | None,
            **constexprs) -> None:
    """Builds [pointers | sizes | tensor ids | chunk starts] and the scalars in one device table
    and launches `kernel` with one program per chunk. `lists` holds 8 lists, empty where absent."""
    params = lists[0]
    n = len(params)
    sizes = [p.numel() for p in params]
    work_t = [t for t, size in enumerate(sizes) for _ in range(0, size, CHUNK)]
    work_s = [start for size in sizes for start in range(0, size, CHUNK)]
    if not work_t:
        return
    rows = []
    for k in range(LISTS):
        source = lists[k] if lists[k] else params  # an absent list is never read: any valid address
        rows.append([x.data_ptr() for x in source])
    ints = [a for row in rows for a in row] + sizes + work_t + work_s
    host = torch.cat([torch.tensor(scalars, dtype=torch.float64).view(torch.int64),
                      torch.tensor(ints, dtype=torch.int64)])
    table = _device_table(host, params[0].device)
    scal, ptrs, sizes_d, work_t_d, work_s_d = table.split([len(scalars), LISTS * n, n, len(work_t), len(work_s)])
    f64 = params[0].dtype == torch.float64
    kernel[(len(work_t), CHUNK // SUB)](ptrs, scal, sizes_d, work_t_d, work_s_d,
                                        scal if found_inf is None else found_inf, n, CHUNK=CHUNK, SPLIT=CHUNK // SUB,
                                        F64=f64, BF16=params[0].dtype == torch.bfloat16,
                           P_TY=TL_TYPES[params[0].dtype], ACC=tl_acc(params[0].dtype), BLOCK=BLOCK,
                           HAS_FOUND=found_inf is not None, **constexprs)


def _check(lists: list[list[torch.Tensor]], names: tuple[str, ...]) -> None:
    params = lists[0]
    if not params:
        raise ValueError("ehm_fast: params is empty")
    p0 = params[0]
    if p0.dtype not in TL_TYPES:
        raise TypeError(f"ehm_fast: unsupported dtype {p0.dtype} (expected a floating type)")
    state = acc_dtype(p0.dtype)
    for k, (name, items) in enumerate(zip(names, lists)):
        if not items:
            continue
        if len(items) != len(params):
            raise ValueError(f"ehm_fast: {name} has {len(items)} tensors, params has {len(params)}")
        want = p0.dtype if k < 3 else torch.float32 if k == 7 else state
        for i, (x, p) in enumerate(zip(items, params)):
            shape = () if k == 7 else p.shape
            if x.device != p0.device or x.dtype != want or x.shape != shape:
                raise ValueError(f"ehm_fast: {name}[{i}] must be {want} on {p0.device} with shape {tuple(shape)}, "
                                 f"got {x.dtype} on {x.device} with shape {tuple(x.shape)}")


def _check_found(found_inf: torch.Tensor | None, device: torch.device) -> None:
    if found_inf is not None and (found_inf.device != device or found_inf.numel() != 1):
        raise ValueError(f"ehm_fast: found_inf must be one element on {device}, got {tuple(found_inf.shape)} on "
                         f"{found_inf.device}")


def cv_adam_(params: Tensors, grads: Tensors, ref_grads: Tensors, anchors: Tensors, exp_avgs: Tensors,
             exp_avg_sqs: Tensors, directions: Tensors, alpha: float, step: int, lr: float, beta1: float, beta2: float,
             eps: float, weight_decay: float, decoupled: bool, steps: Tensors,
             found_inf: torch.Tensor | None) -> None:
    lists = [list(params), list(grads), list(ref_grads), list(anchors), list(exp_avgs), list(exp_avg_sqs),
             list(directions), list(steps)]
    _check(lists, ("params", "grads", "ref_grads", "anchors", "exp_avgs", "exp_avg_sqs", "out_directions", "steps"))
    _check_found(found_inf, params[0].device)
    if not steps and step < 1:
        raise ValueError(f"ehm_fast: step must be >= 1, got {step}")
    # as torch.optim.Adam computes them, in double on the host (or in the kernel from `steps`)
    bc1 = 1 - beta1 ** float(max(step, 1))
    bc2 = 1 - beta2 ** float(max(step, 1))
    log2 = (lambda b: math.log2(b) if b > 0 else -math.inf)
    scalars = [alpha, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, 1 - lr * weight_decay, -(lr / bc1),
               math.pow(bc2, 0.5), log2(beta1), log2(beta2), lr]
    _launch(_cv_adam_kernel, lists, scalars, found_inf, HAS_CV=bool(ref_grads), HAS_DIR=bool(directions),
            DECOUPLED=bool(decoupled), HAS_WD=weight_decay != 0, DEVICE_STEP=bool(steps))


def cv_sgd_(params: Tensors, grads: Tensors, ref_grads: Tensors, anchors: Tensors, momentum_buffers: Tensors,
            directions: Tensors, alpha: float, lr: float, momentum: float, dampening: float, weight_decay: float,
            nesterov: bool, first: bool, found_inf: torch.Tensor | None) -> None:
    has_buf = momentum != 0
    lists = [list(params), list(grads), list(ref_grads), list(anchors), list(momentum_buffers) if has_buf else [],
             [], list(directions), []]
    _check(lists, ("params", "grads", "ref_grads", "anchors", "momentum_buffers", "", "out_directions", ""))
    _check_found(found_inf, params[0].device)
    scalars = [alpha, -lr, momentum, 1 - dampening, weight_decay]
    _launch(_cv_sgd_kernel, lists, scalars, found_inf, HAS_CV=bool(ref_grads), HAS_DIR=bool(directions),
            HAS_BUF=has_buf, FIRST=bool(first), NESTEROV=bool(nesterov), HAS_WD=weight_decay != 0)
