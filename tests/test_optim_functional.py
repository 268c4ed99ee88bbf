"""The fused control-variate updates (ehm_fast.optim.functional) on every backend against the
for-loop reference, and with alpha = 0 against torch.optim.Adam/AdamW/SGD."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ehm_fast import _backend
from ehm_fast.optim import functional as F
from ehm_fast.optim import reference

CHUNK = 1 << 16
# mixed sizes: empty, size 1, odd, a conv weight, one tensor larger than a chunk
SHAPES = [(0,), (1,), (7,), (3, 5), (4, 3, 3, 3), (CHUNK + 37,), (0, 4), (33,)]
SMALL = [(0,), (1,), (7,), (3, 5), (2, 3, 3, 3), (33,)]


def _lists(shapes, dtype, device, state=True):
    sd = F.state_dtype(dtype)
    make = lambda d: [torch.randn(s, device=device).to(d) for s in shapes]  # noqa: E731
    out = {"params": make(dtype), "grads": make(dtype), "ref_grads": make(dtype), "anchors": make(sd)}
    if state:
        out["exp_avgs"] = [torch.randn(s, device=device).mul_(0.1).to(sd) for s in shapes]
        out["exp_avg_sqs"] = [torch.rand(s, device=device).mul_(0.01).to(sd) for s in shapes]
    return out


def _clone(lists):
    return {k: [x.clone() for x in v] for k, v in lists.items()}


def _assert_params_close(got, want, dtype):
    for g, w in zip(got, want):
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, rtol=2e-6, atol=1e-6)
        else:  # one fp32 rounding apart can flip a bf16 rounding, and flips compound over steps:
            # allow one bf16 ulp of the value, or of the unit-scale values around it
            torch.testing.assert_close(g.float(), w.float(), rtol=2**-7, atol=2**-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_matches_reference(backend_device, dtype, decoupled):
    backend, device = backend_device
    shapes = SHAPES if backend != "triton" or device != "cpu" else SMALL + [(CHUNK + 37,)]
    base = _lists(shapes, dtype, device)
    got, want = _clone(base), _clone(base)
    dirs_got = [torch.full(s, float("nan"), device=device) for s in shapes]  # poisoned: every element is written
    dirs_want = [torch.empty(s, device=device) for s in shapes]
    for step in (1, 2, 3):
        kw = dict(alpha=0.6, step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05,
                  decoupled=decoupled)
        F.cv_adam_(*got.values(), **kw, out_directions=dirs_got, backend=backend)
        F.cv_adam_(*want.values(), **kw, out_directions=dirs_want, backend="torch")
    _assert_params_close(got["params"], want["params"], dtype)
    # a bf16 parameter one ulp apart feeds weight decay: the fp32 state then differs by ~wd * ulp
    rtol = 1e-5 if dtype == torch.float32 else 1e-3
    for k in ("exp_avgs", "exp_avg_sqs"):
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=1e-7)
    torch.testing.assert_close(dirs_got, dirs_want, rtol=rtol / 10, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.0, 0.0, False), (0.9, 0.1, False), (0.9, 0.0, True)])
def test_sgd_matches_reference(backend_device, dtype, momentum, dampening, nesterov):
    backend, device = backend_device
    shapes = SHAPES if backend != "triton" or device != "cpu" else SMALL
    base = _lists(shapes, dtype, device, state=False)
    got, want = _clone(base), _clone(base)
    bufs_got, bufs_want = [None] * len(shapes), [None] * len(shapes)
    for _ in range(3):  # the first step initialises the buffers, the next ones use them
        kw = dict(alpha=0.8, lr=0.05, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=0.01)
        F.cv_sgd_(*got.values(), bufs_got, **kw, backend=backend)
        F.cv_sgd_(*want.values(), bufs_want, **kw, backend="torch")
    _assert_params_close(got["params"], want["params"], dtype)
    if momentum:  # see test_adam_matches_reference for the bf16 tolerance
        torch.testing.assert_close(bufs_got, bufs_want, rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-6)


def _torch_optim(kind, params, **kw):
    if kind == "sgd":
        return torch.optim.SGD(params, foreach=False, **kw)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(params, foreach=False, **kw)


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("with_cv", [False, True])
def test_alpha_zero_is_torch_optim(backend_device, kind, with_cv):
    """alpha = 0 (or no control variate) is exactly torch.optim's rule, to fp32 rounding, over several steps."""
    backend, device = backend_device
    shapes = SHAPES if backend != "triton" or device != "cpu" else SMALL
    params = [torch.randn(s, device=device) for s in shapes]
    ours = [p.clone() for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    if kind == "sgd":
        opt = _torch_optim(kind, theirs, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    else:
        opt = _torch_optim(kind, theirs, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    bufs = [None] * len(params)
    for step in range(1, 6):
        grads = [torch.randn_like(p) for p in params]
        ref = [torch.randn_like(p) for p in params] if with_cv else None
        anchors = [torch.randn_like(p) for p in params] if with_cv else None
        if kind == "sgd":
            F.cv_sgd_(ours, grads, ref, anchors, bufs, alpha=0.0, lr=0.1, momentum=0.9, nesterov=True,
                      weight_decay=0.01, backend=backend)
        else:
            F.cv_adam_(ours, grads, ref, anchors, m, v, alpha=0.0, step=step, lr=1e-2, beta1=0.8, beta2=0.99,
                       eps=1e-6, weight_decay=0.05, decoupled=kind == "adamw", backend=backend)
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
    # fp32 rounding of m / (sqrt(v) + eps) differs in the order of operations from torch's; where
    # sqrt(v) is near eps that can move a rare element by ~1e-3 of one step (lr = 1e-2)
    torch.testing.assert_close(ours, [p.detach() for p in theirs], rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decoupled", [False, True])
def test_device_step_counts_equal_the_host_step(backend_device, dtype, decoupled):
    """Step counts as tensors (read by the kernel, bias corrections in double there) give the
    update of the host step: every state tensor equal to float32 rounding of the same formula."""
    backend, device = backend_device
    base = _lists(SMALL, dtype, device)
    got, want = _clone(base), _clone(base)
    counts = [torch.zeros((), device=device) for _ in SMALL]
    for step in (1, 2, 3, 1000):
        for c in counts:
            c.fill_(step)
        kw = dict(alpha=0.6, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, decoupled=decoupled)
        F.cv_adam_(*got.values(), step=counts, **kw, backend=backend)
        F.cv_adam_(*want.values(), step=step, **kw, backend=backend)
    _assert_params_close(got["params"], want["params"], dtype)
    for k in ("exp_avgs", "exp_avg_sqs"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-7)


def _untouched(before: dict, after: dict) -> None:
    for k in before:
        for b, a in zip(before[k], after[k]):
            assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num()), k


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_found_inf_skips_the_whole_update(backend_device, kind):
    """found_inf = 1 leaves parameters, state and directions bit for bit as they were (a NaN
    gradient included); found_inf = 0 is the update without the flag, bit for bit."""
    backend, device = backend_device
    base = _lists(SMALL, torch.float32, device)
    base["grads"][-1][0] = float("nan")
    dirs = [torch.full(s, 7.0, device=device) for s in SMALL]
    counts = [torch.full((), 3.0, device=device) for _ in SMALL]

    def update(lists, directions, found, **kw):
        if kind == "adam":
            F.cv_adam_(*lists.values(), alpha=0.5, step=counts, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                       out_directions=directions, found_inf=found, backend=backend)
        else:
            bufs = list(lists["exp_avgs"])  # existing momentum buffers
            F.cv_sgd_(lists["params"], lists["grads"], lists["ref_grads"], lists["anchors"], bufs, alpha=0.5, lr=0.1,
                      momentum=0.9, out_directions=directions, found_inf=found, backend=backend)

    skipped, skipped_dirs = _clone(base), [d.clone() for d in dirs]
    update(skipped, skipped_dirs, torch.ones(1, device=device))
    _untouched({**base, "dirs": dirs}, {**skipped, "dirs": skipped_dirs})
    flagged, flagged_dirs = _clone(base), [d.clone() for d in dirs]
    plain, plain_dirs = _clone(base), [d.clone() for d in dirs]
    update(flagged, flagged_dirs, torch.zeros(1, device=device))
    update(plain, plain_dirs, None)
    _untouched({**plain, "dirs": plain_dirs}, {**flagged, "dirs": flagged_dirs})
    assert not torch.equal(flagged["params"][1], base["params"][1]), "the update ran"


def test_error_device_step_and_found_inf():
    x = _one()
    kw = _adam_kw()
    kw.pop("step")
    with pytest.raises(TypeError, match=r"step\[0\] must be a 0-d float32 tensor"):
        F.cv_adam_(*x.values(), step=[torch.tensor(1.0, dtype=torch.float64)], **kw)
    with pytest.raises(ValueError, match="step has 2 tensors, params has 1"):
        F.cv_adam_(*x.values(), step=[torch.tensor(1.0)] * 2, **kw)
    with pytest.raises(TypeError, match="found_inf must be a one-element float32 tensor"):
        F.cv_adam_(*x.values(), step=1, found_inf=torch.zeros(2), **kw)
    with pytest.raises(ValueError, match="found_inf is on meta"):
        F.cv_sgd_(x["params"], x["grads"], None, None, None, alpha=0.0, lr=0.1, found_inf=torch.zeros(1, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direction_exact_cases(backend_device, dtype):
    """g == g_ref with alpha = 1 gives v = anchor exactly (SVRG at its snapshot); alpha = 0 gives v = g."""
    backend, device = backend_device
    base = _lists(SMALL, dtype, device, state=False)
    dirs = [torch.full(s, float("nan"), device=device) for s in SMALL]
    F.cv_sgd_(base["params"], base["grads"], [g.clone() for g in base["grads"]], base["anchors"], None,
              alpha=1.0, lr=0.1, out_directions=dirs, backend=backend)
    for d, a in zip(dirs, base["anchors"]):
        assert torch.equal(d, a)
    F.cv_sgd_(base["params"], base["grads"], base["ref_grads"], base["anchors"], None, alpha=0.0, lr=0.1,
              out_directions=dirs, backend=backend)
    for d, g in zip(dirs, base["grads"]):
        assert torch.equal(d, g.float())


def test_storm_direction_aliases_anchor(backend_device):
    """STORM keeps one direction buffer: anchors and out_directions may be the same tensors."""
    backend, device = backend_device
    base = _lists(SMALL, torch.float32, device)
    got, want = _clone(base), _clone(base)
    F.cv_adam_(*got.values(), alpha=0.7, step=4, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
               out_directions=got["anchors"], backend=backend)
    out = [torch.empty_like(a) for a in want["anchors"]]
    F.cv_adam_(*want.values(), alpha=0.7, step=4, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
               out_directions=out, backend="torch")
    torch.testing.assert_close(got["anchors"], out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got["params"], want["params"], rtol=2e-6, atol=1e-6)


def test_bucket_over_several_launches(backend_device):
    """More chunks (> 320) and tensors (> 24) than one CUDA argument table holds: a tensor split
    across two launches, followed by enough tensors to reuse its first table's slot."""
    backend, device = backend_device
    if device != "cuda":
        pytest.skip("20M elements: a GPU case (the launch tables are a CUDA detail)")
    shapes = [(5,)] * 3 + [(318 * CHUNK + 11,)] + [(7 + i,) for i in range(30)] + [(2 * CHUNK + 3,)]
    base = _lists(shapes, torch.float32, device)
    got, want = _clone(base), _clone(base)
    kw = dict(alpha=0.6, step=2, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)
    F.cv_adam_(*got.values(), **kw, backend=backend)
    F.cv_adam_(*want.values(), **kw, backend="torch")
    _assert_params_close(got["params"], want["params"], torch.float32)
    torch.testing.assert_close(got["exp_avg_sqs"], want["exp_avg_sqs"], rtol=1e-5, atol=1e-7)


def test_channels_last_layout(backend_device):
    backend, device = backend_device
    shape = (3, 4, 5, 2)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    p, g, r, a = (cl(torch.randn(shape, device=device)) for _ in range(4))
    m, v = cl(torch.zeros(shape, device=device)), cl(torch.zeros(shape, device=device))
    want = [x.clone() for x in (p, g, r, a, m, v)]
    kw = dict(alpha=0.5, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    F.cv_adam_([p], [g], [r], [a], [m], [v], **kw, backend=backend)
    F.cv_adam_(*([x] for x in want), **kw, backend="torch")
    torch.testing.assert_close(p, want[0], rtol=2e-6, atol=1e-6)


def _adam_kw(**over):
    kw = dict(alpha=1.0, step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
    kw.update(over)
    return kw


def _one(shape=(5,), dtype=torch.float32):
    return _lists([shape], dtype, "cpu")


def test_error_sparse_grads():
    x = _one()
    x["grads"] = [torch.randn(5).to_sparse()]
    with pytest.raises(TypeError, match=r"grads\[0\] is torch.sparse_coo"):
        F.cv_adam_(*x.values(), **_adam_kw())


def test_error_lengths_and_pairing():
    x = _one()
    x["grads"] = x["grads"] * 2
    with pytest.raises(ValueError, match="grads has 2 tensors, params has 1"):
        F.cv_adam_(*x.values(), **_adam_kw())
    x = _one()
    x["anchors"] = None
    with pytest.raises(ValueError, match="ref_grads and anchors are given together"):
        F.cv_adam_(*x.values(), **_adam_kw())


def test_error_state_dtype_and_shape():
    x = _one(dtype=torch.bfloat16)
    x["exp_avgs"] = [torch.zeros(5, dtype=torch.bfloat16)]
    with pytest.raises(TypeError, match=r"exp_avgs\[0\] must be torch.float32"):
        F.cv_adam_(*x.values(), **_adam_kw())
    x = _one()
    x["ref_grads"] = [torch.randn(6)]
    with pytest.raises(ValueError, match=r"ref_grads\[0\] must have the shape of params\[0\]"):
        F.cv_adam_(*x.values(), **_adam_kw())


def test_error_scalars():
    for kw, msg in ((dict(step=0), "step must be an int >= 1"), (dict(lr=-1.0), "lr must be >= 0"),
                    (dict(beta1=1.0), r"beta1 must be in \[0.0, 1.0\)")):
        with pytest.raises(ValueError, match=msg):
            F.cv_adam_(*_one().values(), **_adam_kw(**kw))
    x = _one()
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        F.cv_sgd_(x["params"], x["grads"], None, None, None, alpha=0.0, lr=0.1, nesterov=True)


@pytest.mark.skipif(not _backend.cpu_built(), reason="ehm_fast._C is not built")
def test_error_devices_and_nothing_touched():
    """A bucket list spanning a device the backend cannot run is rejected before any tensor changes."""
    x = _one()
    meta = {k: [torch.empty(3, device="meta", dtype=v[0].dtype)] for k, v in _one((3,)).items()}
    lists = {k: x[k] + meta[k] for k in x}
    before = [t.clone() for t in x["params"] + x["exp_avgs"]]
    with pytest.raises(ValueError, match="backend 'cpu' runs on CPU tensors"):
        F.cv_adam_(*lists.values(), **_adam_kw(), backend="cpu")
    for b, a in zip(before, x["params"] + x["exp_avgs"]):
        assert torch.equal(a, b)
    x = _one()
    x["grads"] = [torch.empty(5, device="meta")]
    with pytest.raises(ValueError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
        F.cv_adam_(*x.values(), **_adam_kw())


@pytest.mark.skipif(not _backend.cpu_built(), reason="ehm_fast._C is not built")
def test_error_layout_for_kernels():
    x = _one((4, 6))
    x["grads"] = [torch.randn(6, 4).t()]
    with pytest.raises(ValueError, match=r"grads\[0\] must be dense with the strides of params\[0\]"):
        F.cv_adam_(*x.values(), **_adam_kw(), backend="cpu")
    want = _clone(x)
    F.cv_adam_(*x.values(), **_adam_kw(), backend="torch")  # the reference takes any layout
    reference.cv_adam_(*(want[k] for k in ("params", "grads", "ref_grads", "anchors", "exp_avgs", "exp_avg_sqs")),
                       [], 1.0, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, False, [], None)
    torch.testing.assert_close(x["params"], want["params"])


@pytest.mark.skipif(not _backend.cpu_built(), reason="ehm_fast._C is not built")
def test_compiled_entry_rejects_mixed_bucket():
    """The C++ entry checks its bucket itself (one device, one dtype) and the failure reaches Python
    as RuntimeError. In a child process, because on the GPU machine of 2026-11-27 (g++ 13.3,
    torch 2.11) a failed C++ check crashed the process instead (README, known shortfalls)."""
    code = """import torch
from ehm_fast import _C
p = [torch.randn(3), torch.randn(3, dtype=torch.float64)]
try:
    _C.cv_sgd_(p, [x.clone() for x in p], [], [], [], [], 0.0, 0.1, 0.0, 0.0, 0.0, False, False, None)
except RuntimeError as e:
    print(e)
"""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, f"a failed C++ check ended the process (exit status {r.returncode}): {r.stderr[-400:]}"
    assert "one bucket is one dtype" in r.stdout
