"""The fused batch norm + activation (ehm_fast.nn.batch_norm) against float64 nn.BatchNorm2d.

Both backends: "torch" (the reference formulas) and "triton" (the interpreter on CPU tensors, the
GPU without it). Every test draws fresh inputs; the seed is printed (EHM_TEST_SEED=<seed> replays).
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_utils import run_ranks

from ehm_fast import _backend
from ehm_fast.nn import batch_norm as bn
from helpers import assert_close_to_reference, rel_err

SLOPE = 0.2
TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
STATS_TOL = 2e-5  # running statistics: fp32 whatever x's dtype
KINK_MARGIN = 1e-3  # pre-activations this close to 0 may take the other side of relu's kink
PAIRS = [("torch", "cpu"), ("triton", "cpu"), ("triton", "cuda")]


def _skip_reason(backend: str, device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "triton" and not _backend.triton_available(device):
        return "triton cannot run here"
    return None


@pytest.fixture(params=PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def layer_backend(request) -> tuple[str, str]:
    """The layer implementations (reference, Triton) and where each runs; the GPU one is listed
    always and skipped without a GPU."""
    reason = _skip_reason(*request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(params=["cpu", "cuda"])
def triton_device(request) -> str:
    reason = _skip_reason("triton", request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    """Runs after conftest's seeding: prints its seed, or replaces it with EHM_TEST_SEED."""
    if os.environ.get("EHM_TEST_SEED"):
        torch.manual_seed(int(os.environ["EHM_TEST_SEED"]))
    print(f"seed {torch.initial_seed()}")


def _act(t, activation):
    return {"linear": t, "relu": F.relu(t), "lrelu": F.leaky_relu(t, SLOPE)}[activation]


def _modules(c, device, momentum=0.1, affine=True, track=True):
    """(ours: fp32 nn.BatchNorm2d with random parameters and running statistics, its float64 copy)."""
    ours = torch.nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track).to(device)
    with torch.no_grad():
        if affine:
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.normal_()
        if track:
            ours.running_mean.normal_()
            ours.running_var.uniform_(0.5, 2.0)
    return ours, copy.deepcopy(ours).double()


def _draw_x(shape, device, dtype, fmt, ref, input_bias, activation, offset, scale):
    """x in dtype and memory format, redrawn until no pre-activation of the float64 module sits at
    relu's kink (where fp32 rounding may pick the other derivative)."""
    for _ in range(100):
        x = (offset + scale * torch.randn(shape, device=device)).to(dtype).to(memory_format=fmt)
        x64 = x.double() + (0 if input_bias is None else input_bias.double().view(1, -1, 1, 1))
        stats = [None if t is None else t.clone() for t in (ref.running_mean, ref.running_var)]
        batch = ref.training or stats[0] is None
        pre = F.batch_norm(x64, *stats, ref.weight, ref.bias, batch, 0.0, ref.eps)
        if activation == "linear" or pre.abs().min() > KINK_MARGIN:
            return x
    raise AssertionError("could not draw x away from the kink")


def _check_step(ours, ref, x, input_bias, activation, backend, tol, what):
    """One forward + backward of bn_act(ours) and of the float64 module on the same values."""
    leaves = [x.detach().clone().requires_grad_()]
    ref_leaves = [x.detach().double().requires_grad_()]
    if input_bias is not None:
        leaves.append(input_bias.detach().clone().requires_grad_())
        ref_leaves.append(input_bias.detach().double().requires_grad_())
    y = bn.bn_act(ours, leaves[0], activation, SLOPE, leaves[1] if input_bias is not None else None,
                  backend=backend)
    ref_in = ref_leaves[0] if input_bias is None else ref_leaves[0] + ref_leaves[1].view(1, -1, 1, 1)
    y_ref = _act(ref(ref_in), activation)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=fmt), f"{what}: output dtype/format"
    assert_close_to_reference(y, y_ref, tol, f"{what}: output")

    # grad_output != 1, in the layout the next layer's backward gives it
    gy = torch.randn(y.shape, dtype=torch.float64, device=y.device).to(memory_format=fmt)
    params, ref_params = list(ours.parameters()), list(ref.parameters())
    grads = torch.autograd.grad(y, leaves + params, gy.to(y.dtype))
    ref_grads = torch.autograd.grad(y_ref, ref_leaves + ref_params, gy)
    assert grads[0].dtype == x.dtype and grads[0].is_contiguous(memory_format=fmt), f"{what}: dx dtype/format"
    assert_close_to_reference(grads[0], ref_grads[0], tol, f"{what}: dx")
    if input_bias is not None:
        # a sum over the batch that cancels to ~0 in training: compare to the size of its terms
        scale = ref_grads[0].abs().sum(dim=(0, 2, 3)).max().item()
        err = (grads[1].double() - ref_grads[1]).abs().max().item() / scale
        assert err <= tol, f"{what}: d input_bias error {err:.3g} of the terms' size"
    for got, want, name in zip(grads[len(leaves):], ref_grads[len(leaves):], ("d weight", "d bias")):
        assert_close_to_reference(got, want, max(tol, STATS_TOL), f"{what}: {name}")
    _check_buffers(ours, ref, what)


def _check_buffers(ours, ref, what):
    if ours.running_mean is not None:
        assert_close_to_reference(ours.running_mean, ref.running_mean, STATS_TOL, f"{what}: running_mean")
        assert_close_to_reference(ours.running_var, ref.running_var, STATS_TOL, f"{what}: running_var")
    if ours.num_batches_tracked is not None:
        assert torch.equal(ours.num_batches_tracked, ref.num_batches_tracked), f"{what}: num_batches_tracked"


def _run(backend, device, shape=(3, 5, 7, 7), dtype=torch.float32, channels_last=False, activation="lrelu",
         with_input_bias=True, train=True, steps=2, offset=1.0, scale=2.0, tol=None, **module_kw):
    ours, ref = _modules(shape[1], device, **module_kw)
    ours.train(train)
    ref.train(train)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ib = torch.randn(shape[1], device=device) if with_input_bias else None
    for step in range(steps):
        x = _draw_x(shape, device, dtype, fmt, ref, ib, activation, offset, scale)
        what = f"{backend} {dtype} {shape} {activation} step {step + 1} (seed {torch.initial_seed()})"
        _check_step(ours, ref, x, ib, activation, backend, tol or TOL[dtype], what)


@pytest.mark.parametrize("activation", bn.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_training_matches_float64_module(layer_backend, activation, dtype, channels_last):
    _run(*layer_backend, dtype=dtype, channels_last=channels_last, activation=activation)


VARIANTS = {
    "batch_of_one": dict(shape=(1, 5, 3, 4), channels_last=True),
    "momentum_none": dict(momentum=None, activation="relu", steps=3),
    "no_affine": dict(affine=False, channels_last=True),
    "no_input_bias": dict(with_input_bias=False, activation="relu"),
    "no_running_stats": dict(track=False),
    "eval": dict(train=False, activation="relu", channels_last=True),
    "eval_bf16": dict(train=False, dtype=torch.bfloat16),
    "eval_no_running_stats": dict(train=False, track=False, channels_last=True),  # batch statistics
    "fp16": dict(dtype=torch.float16, channels_last=True),
    "fp64": dict(dtype=torch.float64),  # fp64 statistics and the exact fp64 slope
    "one_channel": dict(shape=(4, 1, 3, 3)),
    "one_pixel": dict(shape=(6, 3, 1, 1), channels_last=True),
    # mean / std = 1e3: a sum of squares in fp32 would lose the variance entirely
    "large_mean": dict(offset=10.0, scale=0.01, tol=5e-3),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_match_float64_module(layer_backend, variant):
    _run(*layer_backend, **VARIANTS[variant])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_many_blocks_and_partial_tiles(triton_device, channels_last, monkeypatch):
    """Tiny tiles so each reduction merges several tiles per program, several programs' partials
    (combined BLOCK_P at a time), and a partial last tile and channel block."""
    from ehm_fast.kernels import batch_norm as K

    monkeypatch.setattr(K, "TILE", 16)
    monkeypatch.setattr(K, "MAX_BLOCK_C", 4)
    monkeypatch.setattr(K, "TARGET_PROGRAMS", 24)
    shape = (2, 5, 5, 5)
    g = K._geometry(torch.empty(shape))
    assert (g.block_r, g.block_c, g.c_blocks, g.chunks()) == (4, 4, 2, (8, 7))  # 2 tiles a chunk, the last 2 rows
    _run("triton", triton_device, shape=shape, channels_last=channels_last, steps=1)


def _gradcheck_inputs(device, train):
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(2, 3, 2, 2, **f64).requires_grad_()
    weight = torch.empty(3, **f64).uniform_(0.5, 1.5).requires_grad_()
    bias, ib = torch.randn(3, **f64).requires_grad_(), torch.randn(3, **f64).requires_grad_()
    running = (None, None) if train else (torch.randn(3, **f64), torch.rand(3, **f64) + 0.5)
    return (x, weight, bias, ib), running


@pytest.mark.parametrize("train", [True, False], ids=["batch", "running"])
def test_gradcheck_float64(layer_backend, train):
    backend, device = layer_backend
    inputs, (rm, rv) = _gradcheck_inputs(device, train)

    def fn(x, weight, bias, ib):
        return bn.batch_norm_act(x, weight, bias, rm, rv, training=train, momentum=0.1, eps=1e-5,
                                 activation="lrelu", slope=SLOPE, input_bias=ib, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs), f"seed {torch.initial_seed()}"


def _op_args(device):
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, device=device).requires_grad_()
    params = [torch.randn(3, dtype=torch.float64, device=device).requires_grad_() for _ in range(3)]
    mean, m2 = torch.ops.ehm_fast.bn_stats(x.detach())
    rstd = torch.rsqrt(m2 / (x.numel() // x.shape[1]) + 1e-5)
    return x, mean, rstd, params


def test_custom_op_equals_eager_path(triton_device):
    """The custom op (what torch.compile traces) and the eager autograd.Function run the same kernels."""
    x, mean, rstd, params = _op_args(triton_device)
    args = (x, mean, rstd, *params, None, None, True, "lrelu", SLOPE)
    var, ref_mean = torch.var_mean(x.detach() + params[2].detach().view(1, -1, 1, 1), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean + params[2].detach(), ref_mean)
    torch.testing.assert_close(rstd, torch.rsqrt(var + 1e-5))
    outs = []
    for fn in (bn._bn_act_fused, torch.ops.ehm_fast.bn_act):
        y = fn(*args)
        outs.append((y.detach(), torch.autograd.grad((y * y.detach()).sum(), [x, *params])))
    (a, ga), (b, gb) = outs
    assert torch.equal(a, b)
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))


def test_custom_ops_pass_opcheck(triton_device):
    """Schema, fake (torch.compile) and autograd registrations agree with the kernels."""
    x, mean, rstd, params = _op_args(triton_device)
    ops = torch.ops.ehm_fast
    gy = torch.randn_like(x)
    torch.library.opcheck(ops.bn_stats.default, (x.detach(),))
    torch.library.opcheck(ops.bn_act.default, (x, mean, rstd, *params, None, None, True, "lrelu", SLOPE))
    torch.library.opcheck(ops.bn_act.default, (x, mean, rstd, None, None, None, None, None, False, "relu", SLOPE))
    torch.library.opcheck(ops.bn_act_bwd_sums.default, (gy, x.detach(), mean, rstd, None, None, None, "relu", SLOPE))
    coef = torch.randn(2, 3, dtype=torch.float64, device=triton_device)
    detached = [p.detach() for p in params]
    torch.library.opcheck(ops.bn_act_bwd_dx.default, (gy, x.detach(), mean, rstd, *detached, coef, "lrelu", SLOPE))


class TestErrors:
    def _call(self, x, **kw):
        c = x.shape[1] if x.dim() > 1 else 1
        args = dict(training=True, momentum=0.1, eps=1e-5)
        args.update(kw)
        return bn.batch_norm_act(x, torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c), **args)

    def test_wrong_dim(self):
        with pytest.raises(ValueError, match=r"shape \[N, C, H, W\], got 3 dimensions"):
            self._call(torch.randn(2, 3, 4))

    def test_channels_do_not_match(self):
        with pytest.raises(ValueError, match="weight has 4 entries but x has 3 channels"):
            bn.batch_norm_act(torch.randn(2, 3, 2, 2), torch.ones(4), None, None, None, training=True,
                              momentum=0.1, eps=1e-5)
        with pytest.raises(ValueError, match="input_bias has 2 entries"):
            self._call(torch.randn(2, 3, 2, 2), input_bias=torch.zeros(2))

    def test_unknown_activation(self):
        with pytest.raises(ValueError, match="activation must be one of"):
            self._call(torch.randn(2, 3, 2, 2), activation="gelu")

    def test_one_value_per_channel_in_training(self):
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            self._call(torch.randn(1, 3, 1, 1))
        module = torch.nn.BatchNorm2d(3)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            bn.bn_act(module, torch.randn(1, 3, 1, 1))
        assert module.num_batches_tracked.item() == 0, "a rejected batch does not count"
        self._call(torch.randn(1, 3, 1, 1), training=False)  # eval mode takes it

    def test_eval_needs_running_stats(self):
        with pytest.raises(ValueError, match="eval mode"):
            bn.batch_norm_act(torch.randn(2, 3, 2, 2), None, None, None, None, training=False, momentum=0.1,
                              eps=1e-5)

    def test_cumulative_average_needs_the_count(self):
        with pytest.raises(ValueError, match="needs num_batches_tracked"):
            self._call(torch.randn(2, 3, 2, 2), momentum=None)


# ---------------------------------------------------------------- synchronised statistics

SPLIT = (3, 2)  # samples per rank: unequal, so the merge must weight the ranks by their counts
SYNC_STEPS = 2


def _sync_run(backend, module, x, gy, ib, group):
    """SYNC_STEPS steps of bn_act + backward; returns everything the ranks must agree on."""
    x, ib = x.clone().requires_grad_(), ib.clone().requires_grad_()
    for _ in range(SYNC_STEPS):
        y = bn.bn_act(module, x, "lrelu", SLOPE, ib, backend=backend, process_group=group)
        y.backward(gy)
    return dict(y=y.detach(), gx=x.grad, gw=module.weight.grad, gb=module.bias.grad, gib=ib.grad,
                running_mean=module.running_mean, running_var=module.running_var,
                count=module.num_batches_tracked)


def _sync_rank(rank, world, path, backends, state, x, gy, ib):
    lo = sum(SPLIT[:rank])
    part = slice(lo, lo + SPLIT[rank])
    for backend in backends:
        module = torch.nn.BatchNorm2d(x.shape[1]).double()
        module.load_state_dict(state)
        result = _sync_run(backend, module, x[part], gy[part], ib, dist.group.WORLD)
        torch.save(result, f"{path}/{backend}-{rank}.pt")


def test_sync_batch_norm_equals_one_process(tmp_path):
    """2 gloo ranks holding 3 and 2 samples give what one process gives on all 5: outputs and x's
    gradient per sample, parameter gradients summed over ranks, the same running statistics."""
    backends = [b for b in ("torch", "triton") if _skip_reason(b, "cpu") is None]
    c = 4
    module, _ = _modules(c, "cpu")
    module.double()
    f64 = dict(dtype=torch.float64)
    x = (1 + 2 * torch.randn(sum(SPLIT), c, 3, 3, **f64)).to(memory_format=torch.channels_last)
    gy, ib = torch.randn(x.shape, **f64), torch.randn(c, **f64)
    run_ranks(_sync_rank, str(tmp_path), backends, module.state_dict(), x, gy, ib)
    for backend in backends:
        single = _sync_run(backend, copy.deepcopy(module), x, gy, ib, None)
        ranks = [torch.load(tmp_path / f"{backend}-{r}.pt") for r in range(len(SPLIT))]
        what = f"{backend} (seed {torch.initial_seed()})"
        for key in ("y", "gx"):
            assert rel_err(torch.cat([r[key] for r in ranks]), single[key]) < 1e-10, f"{what}: {key}"
        for key in ("gw", "gb"):
            assert rel_err(sum(r[key] for r in ranks), single[key]) < 1e-10, f"{what}: {key}"
        # input_bias: each rank's gradient is the sum of its own samples' x gradients
        scale = single["gx"].abs().sum(dim=(0, 2, 3)).max()
        own = torch.split(single["gx"], SPLIT)
        for r, gx in zip(ranks, own):
            assert (r["gib"] - gx.sum(dim=(0, 2, 3))).abs().max() / scale < 1e-10, f"{what}: gib"
        for r in ranks:
            for key in ("running_mean", "running_var"):
                assert rel_err(r[key], single[key]) < 1e-12, f"{what}: {key}"
            assert torch.equal(r["count"], single["count"])
