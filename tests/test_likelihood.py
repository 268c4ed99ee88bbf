"""The likelihood terms, wake and sleep losses of every backend against the float64 reference."""

import math

import pytest
import torch

import ehm_fast.losses as L
from ehm_fast import reference

IMAGE = {
    "gaussian": (L.gaussian_nll, reference.gaussian_nll),
    "laplace": (L.laplace_nll, reference.laplace_nll),
    "bernoulli": (L.bernoulli_nll, reference.bernoulli_nll),
}
SCALES = {"scalar": (), "channel": (3, 1, 1), "pixel": (3, 5, 7)}


@pytest.fixture
def poisoned():
    """torch.empty returns NaN while the test runs, so an output element a kernel forgot shows."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def image_inputs(kind, shape, scale, device, dtype=torch.float32):
    x = torch.rand(shape, device=device) if kind == "bernoulli" else torch.randn(shape, device=device)
    mean = torch.randn(shape, device=device) * 2
    ls = None if kind == "bernoulli" else (0.3 * torch.randn(scale, device=device) - 0.2)
    return [t if t is None else t.to(dtype).requires_grad_() for t in (x, mean, ls)]


def call(fn, x, mean, ls, **kw):
    return fn(x, mean, **kw) if ls is None else fn(x, mean, ls, **kw)


def check_against_reference(kind, x, mean, ls, backend, tol, reduction="none"):
    ours, ref_fn = IMAGE[kind]
    out = call(ours, x, mean, ls, reduction=reduction, backend=backend)
    x64, m64 = x.detach().double().requires_grad_(), mean.detach().double().requires_grad_()
    ls64 = None if ls is None else ls.detach().double().requires_grad_()
    ref = ref_fn(x64, m64, ls64, reduction) if ls64 is not None else ref_fn(x64, m64, reduction)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol
    grad_out = torch.randn_like(ref) + 1.5  # != 1
    inputs = [t for t in (x, mean, ls) if t is not None]
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    grads64 = torch.autograd.grad(ref, [t for t in (x64, m64, ls64) if t is not None], grad_out)
    for t, g, g64 in zip(inputs, grads, grads64):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert rel_err(g, g64) < tol


@pytest.mark.parametrize("kind,scale", [("gaussian", s) for s in SCALES] + [("laplace", "channel"), ("laplace", "pixel"), ("bernoulli", "scalar")])
def test_image_nll_matches_reference(backend_device, poisoned, kind, scale):
    backend, device = backend_device
    x, mean, ls = image_inputs(kind, (4, 3, 5, 7), SCALES[scale], device)
    check_against_reference(kind, x, mean, ls, backend, 1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "bernoulli"])
def test_image_nll_large_images(backend_device, kind):
    """3x64x64 images: rows split over several forward programs (d > 1024 / 4096) and many column
    blocks in the backward (d > 256)."""
    backend, device = backend_device
    x, mean, ls = image_inputs(kind, (3, 3, 64, 64), (3, 64, 64), device)  # a per-pixel log_scale
    check_against_reference(kind, x, mean, ls, backend, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("batch", [1, 70])
def test_image_nll_batch_sizes_and_reductions(backend_device, poisoned, batch, reduction):
    backend, device = backend_device
    x, mean, ls = image_inputs("gaussian", (batch, 3, 5, 7), (3, 1, 1), device)
    check_against_reference("gaussian", x, mean, ls, backend, 1e-5, reduction)


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "bernoulli"])
def test_image_nll_channels_last_and_strided(backend_device, kind):
    backend, device = backend_device
    x, mean, ls = image_inputs(kind, (3, 3, 5, 7), (3, 5, 7), device)
    cl = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in (x, mean)]
    check_against_reference(kind, *cl, ls, backend, 1e-5)
    grad_x = torch.autograd.grad(call(IMAGE[kind][0], *cl, ls, backend=backend).sum(), cl[0])[0]
    assert grad_x.is_contiguous(memory_format=torch.channels_last)  # the rows were views, not copies
    wide = [torch.randn(3, 3, 5, 14, device=device)[..., ::2].requires_grad_() for _ in range(2)]
    if kind == "bernoulli":
        wide[0] = wide[0].detach().sigmoid().requires_grad_()
    check_against_reference(kind, *wide, ls, backend, 1e-5)


def test_image_nll_bf16_error_at_most_twice_torch(backend_device):
    backend, device = backend_device
    for kind, (ours, ref_fn) in IMAGE.items():
        x, mean, ls = (t if t is None else t.detach() for t in image_inputs(kind, (8, 3, 16, 16), (3, 1, 1), device))
        xb, mb = x.bfloat16(), mean.bfloat16()
        lsb = None if ls is None else ls.bfloat16()
        exact = call(ref_fn, xb.double(), mb.double(), None if lsb is None else lsb.double())
        torch_err = rel_err(call(ref_fn, xb, mb, lsb), exact)
        our_err = rel_err(call(ours, xb, mb, lsb, backend=backend), exact)
        assert our_err <= 2 * torch_err + 1e-6, (kind, our_err, torch_err)


def test_image_nll_extreme_logits_and_nan(backend_device):
    backend, device = backend_device
    logits = torch.tensor([[80.0, -80.0, 79.5, -3.0], [-80.0, 80.0, 0.5, 1.0]], device=device)
    x = torch.tensor([[1.0, 0.0, 0.3, 1.0], [1.0, 0.0, 1.0, 0.0]], device=device)
    out = L.bernoulli_nll(x, logits, backend=backend)
    ref = reference.bernoulli_nll(x.double(), logits.double())
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-6
    g = torch.autograd.grad(L.bernoulli_nll(x, logits.requires_grad_(), backend=backend).sum(), logits)[0]
    assert torch.isfinite(g).all()
    x[1, 2] = float("nan")
    out = L.gaussian_nll(x, logits, 0.5, backend=backend)
    assert torch.isfinite(out[0]) and torch.isnan(out[1])


def code_inputs(shape, device, dtype=torch.float32, n=4):
    return [torch.randn(shape, device=device, dtype=dtype).requires_grad_() for _ in range(n)]


CODE_OPS = {
    "latent": (L.latent_nll, reference.latent_nll, 3),
    "std_normal": (L.std_normal_nll, reference.std_normal_nll, 1),
    "kl_std": (L.kl_normal, reference.kl_normal, 2),
    "kl_pair": (L.kl_normal, reference.kl_normal, 4),
}


def check_code(name, args, backend, tol, reduction="none"):
    ours, ref_fn, _ = CODE_OPS[name]
    out = ours(*args, reduction=reduction, backend=backend)
    args64 = [a.detach().double().requires_grad_() for a in args]
    ref = ref_fn(*args64, reduction=reduction)
    assert out.shape == ref.shape and rel_err(out, ref) < tol
    grad_out = torch.rand_like(ref) + 0.5
    grads = torch.autograd.grad(out, args, grad_out.to(out.dtype))
    for g, g64 in zip(grads, torch.autograd.grad(ref, args64, grad_out)):
        assert rel_err(g, g64) < tol


@pytest.mark.parametrize("name", list(CODE_OPS))
@pytest.mark.parametrize("shape", [(5, 37), (1, 3), (6, 2, 5)])
def test_code_terms_match_reference(backend_device, poisoned, name, shape):
    backend, device = backend_device
    args = code_inputs(shape, device, n=CODE_OPS[name][2])
    check_code(name, args, backend, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_code_terms_reductions_and_strides(backend_device, reduction):
    backend, device = backend_device
    args = [torch.randn(9, 40, device=device)[:, ::2].requires_grad_() for _ in range(3)]
    check_code("latent", args, backend, 1e-5, reduction)
    args = [torch.randn(20, 7, device=device).t().requires_grad_() for _ in range(4)]  # [7, 20], transposed
    check_code("kl_pair", args, backend, 1e-5, reduction)


def test_code_terms_extreme_logvar(backend_device):
    backend, device = backend_device
    z, mu = (0.1 * torch.randn(4, 16, device=device) for _ in range(2))
    logvar = 80.0 * torch.randint(0, 2, (4, 16), device=device).float() * 2 - 80.0  # +-80
    check_code("latent", [t.requires_grad_() for t in (z, mu, logvar)], backend, 1e-5)
    check_code("kl_std", [t.detach().requires_grad_() for t in (mu, logvar)], backend, 1e-5)
    logvar2 = logvar + torch.randn_like(logvar)  # +-80 as well, with exp(logvar - logvar2) finite
    check_code("kl_pair", [t.detach().requires_grad_() for t in (mu, logvar, z, logvar2)], backend, 1e-5)


def skip_interpreted_bf16(backend, device, dtype):
    """The Triton interpreter truncates fp32 -> bf16 stores (compiled Triton rounds to nearest even),
    which alone doubles the output's rounding error; fp16 stores round correctly there."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 conversions")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_code_terms_low_precision_error_at_most_twice_torch(backend_device, dtype):
    backend, device = backend_device
    skip_interpreted_bf16(backend, device, dtype)
    for name, (ours, ref_fn, n) in CODE_OPS.items():
        args = [torch.randn(16, 100, device=device).to(dtype) for _ in range(n)]
        exact = ref_fn(*[a.double() for a in args])
        torch_err = rel_err(ref_fn(*args), exact)
        our_err = rel_err(ours(*args, backend=backend), exact)
        assert our_err <= 2 * torch_err + 1e-6, (name, our_err, torch_err)


def test_float64_gradcheck_cpu_kernels():
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    mean = torch.randn_like(x, requires_grad=True)
    for scale in [(), (3, 1, 1), (3, 2, 3)]:
        ls = (0.3 * torch.randn(scale, dtype=torch.float64)).requires_grad_()
        assert torch.autograd.gradcheck(lambda *a: L.gaussian_nll(*a, backend="cpu"), (x, mean, ls))
        assert torch.autograd.gradcheck(lambda *a: L.laplace_nll(*a, backend="cpu"), (x, mean, ls))
    target = torch.rand(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: L.bernoulli_nll(*a, backend="cpu"), (target, mean))
    codes = [torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    for name, (ours, _, n) in CODE_OPS.items():
        assert torch.autograd.gradcheck(lambda *a: ours(*a, backend="cpu"), tuple(codes[:n])), name
    scores = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: L.sleep_loss(*a, backend="cpu"), (*codes[:3], scores))
    z = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    ls = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: L.wake_loss(*a, backend="cpu"), (x, mean, ls, z))


def test_only_needed_gradients_are_computed(backend_device):
    backend, device = backend_device
    x, mean, ls = image_inputs("gaussian", (2, 3, 5, 7), (3, 1, 1), device)
    x = x.detach()
    out = L.gaussian_nll(x, mean, ls.detach(), backend=backend)
    (g,) = torch.autograd.grad(out.sum(), mean)
    assert x.grad is None and g.shape == mean.shape


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace", "bernoulli"])
def test_wake_loss_matches_reference(backend_device, poisoned, likelihood):
    backend, device = backend_device
    x, mean, ls = image_inputs(likelihood, (3, 3, 5, 7), (3, 1, 1), device)
    z = torch.randn(3, 11, device=device, requires_grad=True)
    inputs = [t for t in (x, mean, ls, z) if t is not None]
    out = L.wake_loss(x, mean, ls, z, likelihood=likelihood, reduction="sum", backend=backend)
    i64 = [t.detach().double().requires_grad_() for t in inputs]
    args64 = (i64[0], i64[1], i64[2] if ls is not None else None, i64[-1])
    ref = reference.wake_loss(*args64, likelihood=likelihood, reduction="sum")
    assert rel_err(out, ref) < 1e-5
    for g, g64 in zip(torch.autograd.grad(2.5 * out, inputs), torch.autograd.grad(2.5 * ref, i64)):
        assert rel_err(g, g64) < 1e-5


def test_sleep_loss_matches_reference(backend_device, poisoned):
    backend, device = backend_device
    z, mu, logvar = code_inputs((6, 13), device, n=3)
    scores = torch.randn(6, 1, device=device, requires_grad=True)
    out = L.sleep_loss(z, mu, logvar, scores, backend=backend)
    i64 = [t.detach().double().requires_grad_() for t in (z, mu, logvar, scores)]
    ref = reference.sleep_loss(*i64)
    assert rel_err(out, ref) < 1e-5
    grad_out = torch.randn(6, device=device)
    for g, g64 in zip(torch.autograd.grad(out, (z, mu, logvar, scores), grad_out),
                      torch.autograd.grad(ref, i64, grad_out.double())):
        assert rel_err(g, g64) < 1e-5


def test_log_partition_gaussian_matches_reference(backend_device):
    backend, device = backend_device
    scores = (10 * torch.randn(6, device=device)).requires_grad_()
    x, mean, ls = image_inputs("gaussian", (6, 3, 4, 5), (3, 1, 1), device)
    out = L.log_partition_gaussian(scores, x, mean, ls, backend=backend)
    i64 = [t.detach().double().requires_grad_() for t in (scores, x, mean, ls)]
    nll = reference.gaussian_nll(*i64[1:])
    ref = torch.logsumexp(i64[0] + nll, 0) - math.log(6)
    assert out.dim() == 0 and rel_err(out, ref) < 1e-5
    for g, g64 in zip(torch.autograd.grad(3 * out, (scores, x, mean, ls)), torch.autograd.grad(3 * ref, i64)):
        assert rel_err(g, g64) < 1e-4


class TestBadInput:
    def test_mismatched_shapes(self):
        with pytest.raises(ValueError, match="mean must have the shape of x"):
            L.gaussian_nll(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5), 0.0)
        with pytest.raises(ValueError, match="logvar must have the shape of z"):
            L.latent_nll(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 4))
        with pytest.raises(ValueError, match="z must have the batch size of x"):
            L.wake_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), 0.0, torch.randn(3, 5))
        with pytest.raises(ValueError, match="critic_scores must hold one score per sample"):
            L.sleep_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.randn(3))

    def test_log_scale_not_one_image(self):
        with pytest.raises(ValueError, match="log_scale of shape"):
            L.gaussian_nll(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.zeros(2, 1, 1))
        with pytest.raises(ValueError, match="log_scale of shape"):
            L.laplace_nll(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
        with pytest.raises(TypeError, match="log_scale must be a float"):
            L.wake_loss(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), None, torch.randn(2, 5))

    def test_bernoulli_targets(self):
        x = torch.rand(2, 3, 4, 4)
        x[0, 0, 0, 0] = 1.5
        with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
            L.bernoulli_nll(x, torch.randn(2, 3, 4, 4), check_targets=True)
        L.bernoulli_nll(x, torch.randn(2, 3, 4, 4))  # unchecked by default

    def test_integer_dtypes(self):
        with pytest.raises(TypeError, match="x must have a floating-point dtype"):
            L.gaussian_nll(torch.ones(2, 3, dtype=torch.int64), torch.randn(2, 3), 0.0)
        with pytest.raises(TypeError, match="logvar must have a floating-point dtype"):
            L.latent_nll(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int32))
        with pytest.raises(TypeError, match="log_scale must have a floating-point dtype"):
            L.gaussian_nll(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(3, dtype=torch.int64))

    def test_mixed_devices(self):
        meta = torch.empty(2, 3, device="meta")
        with pytest.raises(ValueError, match="one device: x on cpu, mean on meta"):
            L.gaussian_nll(torch.randn(2, 3), meta, 0.0)
        with pytest.raises(ValueError, match="one device"):
            L.gaussian_nll(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(3, device="meta"))
        with pytest.raises(ValueError, match="one device: z on cpu, critic_scores on meta"):
            L.sleep_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3), torch.empty(2, device="meta"))

    def test_unknown_names(self):
        x = torch.randn(2, 3)
        with pytest.raises(ValueError, match="reduction must be one of"):
            L.std_normal_nll(x, reduction="avg")
        with pytest.raises(ValueError, match="likelihood must be one of"):
            L.wake_loss(x, x, 0.0, x, likelihood="poisson")
        with pytest.raises(ValueError, match="prior must be 'normal'"):
            L.wake_loss(x, x, 0.0, x, prior="vamp")
        with pytest.raises(ValueError, match="backend must be one of"):
            L.kl_normal(x, x, backend="gpu")

    def test_missing_batch(self):
        with pytest.raises(ValueError, match="z must have a batch dimension"):
            L.std_normal_nll(torch.randn(5))
        with pytest.raises(ValueError, match="give both mu2 and logvar2"):
            L.kl_normal(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3))


def test_custom_ops_pass_opcheck(backend_device):
    """Schema, fake (torch.compile) and autograd registrations of every op agree with the kernels."""
    backend, device = backend_device
    f64 = dict(dtype=torch.float64, device=device, requires_grad=True)
    x, mean, codes = torch.randn(3, 20, **f64), torch.randn(3, 20, **f64), torch.randn(3, 20, **f64)
    scale = torch.randn(20, **f64)
    z, mu_k, logvar_k = torch.randn(3, 5, **f64), torch.randn(4, 5, **f64), torch.randn(4, 5, **f64)
    base = torch.randn(3, **f64)
    ops = torch.ops.ehm_fast
    torch.library.opcheck(ops.image_nll.default, (x, mean, scale, 0, backend))
    torch.library.opcheck(ops.image_nll.default, (x.detach().sigmoid(), mean, None, 2, backend))
    torch.library.opcheck(ops.code_nll.default, (x, mean, codes, None, base, 0, backend))
    torch.library.opcheck(ops.code_nll.default, (x, mean, codes, mean, None, 3, backend))
    torch.library.opcheck(ops.vamp_prior.default, (z, mu_k, logvar_k, base, backend))
    torch.library.opcheck(ops.wake.default, (x, mean, scale, 1, z, mu_k, logvar_k, backend))
    torch.library.opcheck(ops.wake.default, (x, mean, scale, 0, z, None, None, backend))


def test_eager_path_equals_the_custom_ops(backend_device):
    """Outside torch.compile the ops run as autograd.Functions that skip the custom-op dispatcher
    (ehm_fast.ops.eager): same kernels, so outputs and gradients must be bit-identical."""
    from ehm_fast.ops import likelihood as lk
    from ehm_fast.ops import log_partition as lp
    from ehm_fast.ops import vamp as vp

    backend, device = backend_device
    f32 = dict(device=device, requires_grad=True)
    x, mean, codes = torch.randn(3, 20, **f32), torch.randn(3, 20, **f32), torch.randn(3, 20, **f32)
    scale, base = torch.randn(20, **f32), torch.randn(3, **f32)
    z, mu_k, logvar_k = torch.randn(3, 5, **f32), torch.randn(4, 5, **f32), torch.randn(4, 5, **f32)
    cases = [
        (lp.log_partition, lp.log_partition_fwd, (x, mean, False, backend)),
        (lk.image_nll, lk.image_nll_op, (x, mean, scale, 0, backend)),
        (lk.code_nll, lk.code_nll_op, (x, mean, codes, None, base, 0, backend)),
        (vp.vamp_prior, vp.vamp_prior_op, (z, mu_k, logvar_k, base, backend)),
        (lk.wake, lk.wake_op, (x, mean, scale, 1, z, mu_k, logvar_k, backend)),
    ]
    for eager, op, args in cases:
        leaves = [a for a in args if isinstance(a, torch.Tensor)]
        outs = []
        for fn in (eager, op):
            out = fn(*args)
            out = out[0] if isinstance(out, tuple) else out
            outs.append((out.detach(), torch.autograd.grad((out * torch.arange(1.0, 4, device=device)).sum(), leaves)))
        (a, ga), (b, gb) = outs
        assert torch.equal(a, b), op
        assert all(torch.equal(u, v) for u, v in zip(ga, gb)), op
