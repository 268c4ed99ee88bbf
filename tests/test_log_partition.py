"""The importance-weighted log-partition estimate in every backend against a float64 oracle."""

import math

import pytest
import torch

import ehm_fast
from ehm_fast import _backend, losses, reference
from helpers import assert_close_to_reference, poisoned_memory, rel_err

ESTIMATORS = ["importance", "jensen"]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


def _check(backend, device, shape, estimator, dtype, with_proposal=True, scale=3.0):
    s = (scale * torch.randn(shape, dtype=torch.float64)).to(device)
    p = torch.randn(shape, dtype=torch.float64).to(device) if with_proposal else None
    s_k = s.to(dtype).requires_grad_()
    p_k = p.to(dtype).requires_grad_() if with_proposal else None
    rows = math.prod(shape[:-1])
    with poisoned_memory((rows,), shape, dtype=dtype, device=device):
        out = losses.log_partition(s_k, p_k, estimator=estimator, backend=backend)
    g = torch.randn(out.shape, dtype=torch.float64).to(device)  # grad_output != 1
    grads = torch.autograd.grad(out, [t for t in (s_k, p_k) if t is not None], g.to(dtype))

    s64 = s_k.detach().double().requires_grad_()
    p64 = p_k.detach().double().requires_grad_() if with_proposal else None
    ref = reference.log_partition(s64, p64, estimator)
    ref_grads = torch.autograd.grad(ref, [t for t in (s64, p64) if t is not None], g)

    assert out.dtype == dtype and out.shape == shape[:-1]
    # plus the rounding of the log-weights s - log q at their own magnitude (a relative eps of
    # max|s - log q| on every weight, before any kernel arithmetic: the oracle sees the same inputs)
    log_w = s_k.detach().double() - (p_k.detach().double() if with_proposal else 0)
    tol = TOL[dtype] * (1 + math.log2(shape[-1])) + 2 * torch.finfo(dtype).eps * log_w.abs().max().item()
    assert_close_to_reference(out, ref, tol, "estimate")
    for got, want, name in zip(grads, ref_grads, ("d scores", "d log_proposal")):
        assert_close_to_reference(got, want, tol, name)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 257), (2, 3, 33), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend_device, estimator, shape, dtype):
    _check(*backend_device, shape, estimator, dtype)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_long_row_split_over_programs(backend_device, estimator):
    # M past one split (16384) exercises the partial + combine path.
    _check(*backend_device, (2, 40000), estimator, torch.float32)


def test_without_proposal(backend_device):
    _check(*backend_device, (4, 100), "importance", torch.float32, with_proposal=False)


@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_extreme_magnitudes(backend_device, scale):
    # The critic "blows up" early in training: values of 1e3-1e4 must not overflow.
    _check(*backend_device, (3, 500), "importance", torch.float32, scale=scale)


def test_neg_inf_entries_and_rows(backend_device):
    backend, device = backend_device
    s = torch.randn(3, 6, device=device)
    s[0] = float("-inf")  # an all -inf row
    s[1, ::2] = float("-inf")  # some -inf entries
    s = s.requires_grad_()
    out = losses.log_partition(s, backend=backend)
    (gs,) = torch.autograd.grad(out, s, torch.full_like(out, 2.0))
    assert out[0].item() == float("-inf")
    assert torch.equal(gs[0], torch.zeros_like(gs[0])), "an all -inf row has zero gradient"
    assert torch.equal(gs[1, ::2], torch.zeros_like(gs[1, ::2])), "-inf entries have zero weight"
    assert not torch.isnan(gs).any()
    expected = reference.log_partition(s.detach()[1:].double())
    assert rel_err(out[1:], expected) < 1e-5
    assert abs(gs[1].sum().item() - 2.0) < 1e-5  # weights sum to 1


@pytest.mark.parametrize("with_proposal", [False, True])
def test_reference_keeps_the_neg_inf_row_contract(with_proposal):
    """The oracle ("torch") gives an all -inf row -inf with zero gradient, as every kernel does
    (torch.logsumexp alone would give that row a NaN gradient)."""
    s = torch.randn(3, 6, dtype=torch.float64)
    s[0] = float("-inf")
    s[1, ::2] = float("-inf")
    s = s.requires_grad_()
    p = torch.randn(3, 6, dtype=torch.float64, requires_grad=True) if with_proposal else None
    leaves = [t for t in (s, p) if t is not None]
    out = losses.log_partition(s, p, backend="torch")
    grads = torch.autograd.grad(out, leaves, torch.full_like(out, 2.0))
    assert out[0].item() == float("-inf")
    for g in grads:
        assert torch.equal(g[0], torch.zeros_like(g[0])) and not torch.isnan(g).any()
    if _backend.cpu_built():  # and the same numbers as the C++ kernel
        kernel = losses.log_partition(s, p, backend="cpu")
        torch.testing.assert_close(out, kernel)
        for g, k in zip(grads, torch.autograd.grad(kernel, leaves, torch.full_like(kernel, 2.0))):
            torch.testing.assert_close(g, k)


def test_nan_propagates_to_its_row_only(backend_device):
    backend, device = backend_device
    s = torch.randn(3, 50, device=device)
    s[1, 7] = float("nan")
    out = losses.log_partition(s, backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bf16_error_within_2x_of_pytorch(backend_device, estimator):
    backend, device = backend_device
    s = (5 * torch.randn(4, 1000, dtype=torch.float64)).to(device)
    p = torch.randn(4, 1000, dtype=torch.float64).to(device)
    exact = reference.log_partition(s.bfloat16().double(), p.bfloat16().double(), estimator)
    torch_bf16 = reference.log_partition(s.bfloat16(), p.bfloat16(), estimator)
    ours = losses.log_partition(s.bfloat16(), p.bfloat16(), estimator=estimator, backend=backend)
    assert ours.dtype == torch.bfloat16
    err_ours, err_torch = rel_err(ours, exact), rel_err(torch_bf16, exact)
    # rounding the fp32 result to bf16 costs up to half an ulp whatever PyTorch got; the Triton
    # interpreter truncates fp32 -> bf16 stores (compiled Triton rounds), a whole ulp
    ulp = 2**-7 if (backend, device) == ("triton", "cpu") else 2**-8
    assert err_ours <= max(2 * err_torch, ulp), (err_ours, err_torch)


def test_non_contiguous_and_broadcast_proposal(backend_device):
    backend, device = backend_device
    base = torch.randn(40, 6, dtype=torch.float64, device=device)
    s = base.t().requires_grad_()  # [6, 40], non-contiguous
    p = torch.randn(40, dtype=torch.float64, device=device).requires_grad_()  # broadcast over rows
    out = losses.log_partition(s, p, backend=backend)
    ref = reference.log_partition(s, p)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (s, p), g)
    want = torch.autograd.grad(ref, (s, p), g)
    assert rel_err(out, ref) < 1e-12
    assert got[1].shape == p.shape
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


def test_only_needed_gradients_and_inputs_untouched(backend_device):
    backend, device = backend_device
    s = torch.randn(2, 30, device=device, requires_grad=True)
    p = torch.randn(2, 30, device=device)  # no grad wanted
    s_before, p_before = s.detach().clone(), p.clone()
    out = losses.log_partition(s, p, backend=backend)
    out.sum().backward()
    assert p.grad is None and s.grad is not None
    assert torch.equal(s.detach(), s_before) and torch.equal(p, p_before)


def test_gradcheck_float64(backend_device):
    backend, device = backend_device
    s = torch.randn(3, 9, dtype=torch.float64, device=device, requires_grad=True)
    p = torch.randn(3, 9, dtype=torch.float64, device=device, requires_grad=True)
    for estimator in ESTIMATORS:
        assert torch.autograd.gradcheck(
            lambda a, b: losses.log_partition(a, b, estimator=estimator, backend=backend), (s, p)
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with > 12 GB free")
def test_more_than_2_pow_31_elements():
    backend = "cuda" if _backend.cuda_built() else "triton"
    m = 2**31 + 5
    s = torch.zeros(1, m, dtype=torch.bfloat16, device="cuda")
    s[0, -1] = 1.0
    out = losses.log_partition(s, backend=backend).float().item()
    expected = math.log((m - 1) + math.e) - math.log(m)
    assert abs(out - expected) < 1e-2


def test_torch_compile_traces_without_graph_break():
    torch._dynamo.reset()
    fn = torch.compile(lambda s, p: losses.log_partition(s, p, backend="cpu"), backend="eager", fullgraph=True)
    s, p = torch.randn(2, 10), torch.randn(2, 10)
    if not _backend.cpu_built():
        pytest.skip("ehm_fast._C is not built")
    assert rel_err(fn(s, p), reference.log_partition(s.double(), p.double())) < 1e-5


# --- the wrappers -----------------------------------------------------------------------------


def test_importance_weights_and_ess():
    s = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, float("-inf"), float("-inf"), float("-inf")]])
    w, ess = losses.importance_weights(s)
    assert torch.allclose(w[0], torch.full((4,), 0.25)) and torch.allclose(ess, torch.tensor([4.0, 1.0]))
    w, ess = losses.importance_weights(torch.full((1, 3), float("-inf")))
    assert torch.equal(w, torch.zeros(1, 3))


def test_critic_loss(backend_device):
    backend, device = backend_device
    f_real, f_fake, lp = (torch.randn(8, dtype=torch.float64, device=device) for _ in range(3))
    for estimator in ESTIMATORS:
        got = losses.critic_loss(f_real, f_fake, lp, estimator=estimator, backend=backend)
        want = -f_real.mean() + reference.log_partition(f_fake, lp, estimator)
        assert rel_err(got, want) < 1e-12
    # jensen without a proposal is the WGAN critic loss
    wgan = losses.critic_loss(f_real, f_fake, estimator="jensen", backend=backend)
    assert rel_err(wgan, f_fake.mean() - f_real.mean()) < 1e-12


# --- dispatch and bad input -------------------------------------------------------------------


def test_backend_selection_precedence(monkeypatch):
    monkeypatch.setenv("EHM_FAST_BACKEND", "torch")
    ehm_fast.set_backend(None)
    assert ehm_fast.get_backend() == "torch"
    ehm_fast.set_backend("cpu")
    assert ehm_fast.get_backend() == "cpu"
    with ehm_fast.use_backend("triton"):
        assert ehm_fast.get_backend() == "triton"
    assert ehm_fast.get_backend() == "cpu"
    ehm_fast.set_backend(None)
    monkeypatch.setenv("EHM_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        ehm_fast.get_backend()


def test_auto_picks_compiled_cpu_kernel():
    if not _backend.cpu_built():
        pytest.skip("ehm_fast._C is not built")
    assert _backend.resolve("auto", torch.device("cpu")) == "cpu"


def test_backend_errors(monkeypatch):
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        losses.log_partition(s, backend="fast")
    with pytest.raises(ValueError, match="CUDA tensors"):
        losses.log_partition(s, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        losses.log_partition(s, backend="triton")


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: losses.log_partition(torch.randint(0, 3, (2, 4))), TypeError, "scores must have a floating"),
        (lambda: losses.log_partition(torch.randn(2, 4, dtype=torch.complex64)), TypeError, "scores"),
        (lambda: losses.log_partition([1.0, 2.0]), TypeError, "scores must be a torch.Tensor"),
        (lambda: losses.log_partition(torch.randn(2, 0)), ValueError, "M = 0"),
        (lambda: losses.log_partition(torch.tensor(1.0)), ValueError, "at least one dimension"),
        (lambda: losses.log_partition(torch.randn(2, 4), torch.randn(3, 4)), ValueError, "log_proposal"),
        (lambda: losses.log_partition(torch.randn(4), torch.randn(2, 4)), ValueError, "log_proposal"),
        (lambda: losses.log_partition(torch.randn(2, 4), torch.randint(0, 2, (2, 4))), TypeError, "log_proposal"),
        (lambda: losses.log_partition(torch.randn(4), torch.randn(4, device="meta")), ValueError, "one device"),
        (lambda: losses.log_partition(torch.randn(4), estimator="elbo"), ValueError, "estimator"),
        (lambda: losses.critic_loss(torch.randn(0), torch.randn(3)), ValueError, "f_real"),
    ],
)
def test_bad_input(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_env_var_backend_is_used(monkeypatch):
    monkeypatch.setenv("EHM_FAST_BACKEND", "torch")
    assert _backend.resolve(None, torch.device("cpu")) == "torch"
    assert _backend.resolve("cpu", torch.device("cpu")) == "cpu" or not _backend.cpu_built()
