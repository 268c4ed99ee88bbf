"""The fused bias + activation (ehm_fast.nn.bias_act) against float64 plain autograd.

Both implementations: "torch" (torch formulas inside the op's autograd Functions) and "triton"
(the kernels: interpreted on CPU tensors, compiled on a GPU). Every test draws fresh inputs; the
seed is printed and named in failure messages (EHM_TEST_SEED=<seed> replays it).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ehm_fast import _backend
from ehm_fast.nn.bias_act import ACTIVATIONS, bias_act, bias_act_bwd, bias_act_fwd, bias_act_reference
from helpers import aot_graph_capture, assert_close_to_reference, rel_err

PAIRS = [("torch", "cpu"), ("triton", "cpu"), ("triton", "cuda")]
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}
SHAPES = {"nchw": [(3, 5, 7, 9), (1, 5, 7, 9)], "nhwc": [(3, 5, 7, 9), (1, 5, 7, 9)], "2d": [(6, 5), (1, 5)]}
KINK_MARGIN = 0.1  # gradcheck's finite differences must not straddle relu's kink
SLOPE = 0.2


def _skip_reason(backend: str, device: str) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "triton" and not _backend.triton_available(device):
        return "triton cannot run here"
    return None


@pytest.fixture(params=PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request) -> tuple[str, str]:
    """(implementation, device); the GPU one is listed always and skipped without a GPU."""
    reason = _skip_reason(*request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(autouse=True)
def seed() -> int:
    """Runs after conftest's seeding: prints its seed, or replaces it with EHM_TEST_SEED."""
    if os.environ.get("EHM_TEST_SEED"):
        torch.manual_seed(int(os.environ["EHM_TEST_SEED"]))
    print(f"seed {torch.initial_seed()}")
    return torch.initial_seed()


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t


def _is_layout(t: torch.Tensor, layout: str) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


def _away_from_kink(shape, bias, dtype, device) -> torch.Tensor:
    """x whose pre-activations x + bias are at least KINK_MARGIN from 0."""
    z = torch.randn(shape, dtype=dtype, device=device)
    z = z + z.sign() * KINK_MARGIN
    return z if bias is None else z - bias.view(1, -1, *[1] * (len(shape) - 2))


# ---------------------------------------------------------------- values and first derivatives


def _expected(x, b, y, gy, activation: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The plain-autograd reference's y and gradients w.r.t. (x[, b]) in float64. Below float64,
    tanh's are taken at the op's own output: 1 - y^2 of the saved y is the op's definition, and
    y's rounding would set their error (relative to |gx|, unbounded where every y is near +-1)."""
    x64 = x.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    inputs64 = (x64,) if b is None else (x64, b64)
    b_as_x = None if b is None else b64.to(x.dtype).double()  # the op rounds the bias to x's dtype
    y64 = bias_act_reference(x64, b_as_x, activation=activation, slope=SLOPE)
    out = y64
    if activation == "tanh" and x.dtype != torch.float64:
        out = bias_act_reference(x64, b_as_x) * (1 - y.detach().double() ** 2)
    return y64.detach(), torch.autograd.grad(out, inputs64, gy.double())


@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_float64_reference(pair, activation, with_bias, dtype, layout, seed):
    backend, device = pair
    for shape in SHAPES[layout]:
        what = f"{backend}-{device} {activation} {dtype} {layout} {shape} (seed {seed})"
        x = _layout(torch.randn(shape, device=device) * 2, layout).to(dtype).requires_grad_()
        # fp32, exact in x's dtype: the interpreter truncates the bias's cast to bf16, torch rounds
        b = torch.randn(shape[1], device=device).to(dtype).float().requires_grad_() if with_bias else None
        y = bias_act(x, b, activation=activation, slope=SLOPE, backend=backend)
        assert y.dtype == dtype and _is_layout(y, layout), f"{what}: dtype or memory format not kept"
        # gy in NCHW whatever y's layout: the backward must walk both in one memory order
        gy = torch.randn(shape, device=device).to(dtype)
        inputs = (x,) if b is None else (x, b)
        grads = torch.autograd.grad(y, inputs, gy)

        y64, grads64 = _expected(x, b, y, gy, activation)
        tol = TOL[dtype]
        assert_close_to_reference(y, y64, tol, f"{what}: y")
        assert_close_to_reference(grads[0], grads64[0], tol, f"{what}: grad x")
        if b is not None:
            assert grads[1].dtype == b.dtype, f"{what}: bias gradient in {grads[1].dtype}, the bias is {b.dtype}"
            assert_close_to_reference(grads[1], grads64[1], tol, f"{what}: grad bias")
        no_grad = bias_act(x.detach(), None if b is None else b.detach(), activation=activation, slope=SLOPE,
                              backend=backend)
        assert torch.equal(no_grad, y.detach()), f"{what}: the no-grad path differs"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_three_dims_and_float64_bias(pair, activation, seed):
    backend, device = pair
    x = torch.randn(4, 3, 11, device=device, requires_grad=True)
    b = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    y = bias_act(x, b, activation=activation, slope=SLOPE, backend=backend)
    gy = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), gy)
    y64, (gx64, gb64) = _expected(x, b, y, gy, activation)
    what = f"{backend}-{device} {activation} (seed {seed})"
    assert gb.dtype == torch.float64, what
    for name, a, e in (("y", y, y64), ("grad x", gx, gx64), ("grad bias", gb, gb64)):
        assert_close_to_reference(a, e, TOL[torch.float32], f"{what}: {name}")


# ---------------------------------------------------------------- higher derivatives


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_and_gradgradcheck(pair, activation, layout, seed):
    backend, device = pair
    b = torch.randn(3, dtype=torch.float64, device=device)
    x = _layout(_away_from_kink((2, 3, 2, 2), b, torch.float64, device), layout).requires_grad_()
    b.requires_grad_()

    def f(x, b):
        return bias_act(x, b, activation=activation, slope=SLOPE, backend=backend)

    what = f"{backend}-{device} {activation} {layout} (seed {seed})"
    # full Jacobians for one layout; the other (the same kernels, other channel indices) in fast mode
    fast = layout == "nhwc"
    assert torch.autograd.gradcheck(f, (x, b), fast_mode=fast), what
    assert torch.autograd.gradgradcheck(f, (x, b), fast_mode=fast), what


def _conv_inputs(seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """(x, w, b, grad_output) in float64, the same for every call with one seed."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(shape, dtype=torch.float64, generator=gen).to(device)

    x, w, b = (draw(*shape).requires_grad_() for shape in ((2, 3, 7, 7), (4, 3, 3, 3), (4,)))
    return x, w, b, draw(2, 4, 5, 5)


def _first_grads(inputs, activation: str, backend: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad x, grad b) of conv2d -> bias + act with a random grad_output: a gradient penalty's
    first backward. backend None: the plain-autograd reference."""
    x, w, b, gy = inputs
    h = F.conv2d(x, w)
    if backend is None:
        y = bias_act_reference(h, b, activation=activation, slope=SLOPE)
    else:
        y = bias_act(h, b, activation=activation, slope=SLOPE, backend=backend)
    return torch.autograd.grad(y, (x, b), gy, create_graph=True)


def _second_grads(inputs, activation: str, backend: str | None) -> list[torch.Tensor]:
    """The gradient of the penalty |grad x|^2 + |grad b|^2 w.r.t. (x, w, b); None read as zero."""
    gx, gb = _first_grads(inputs, activation, backend)
    grads = torch.autograd.grad((gx**2).sum() + (gb**2).sum(), inputs[:3], allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_second_order_gradients_equal_plain_autograd(pair, activation, seed):
    backend, device = pair
    ours = _second_grads(_conv_inputs(seed, device), activation, backend)
    plain = _second_grads(_conv_inputs(seed, device), activation, None)
    for name, a, e in zip(("x", "w", "b"), ours, plain):
        err = rel_err(a, e) if e.abs().max() > 0 else a.abs().max().item()
        assert err <= TOL[torch.float64], f"{backend}-{device} {activation} d/d{name}: {err:.3g} (seed {seed})"


def _read_arguments(func, args, kwargs) -> list:
    """An op's arguments but those its schema says it writes: a destination (copy_'s, out=) can be
    fresh memory that happens to read as zeros."""
    written = {a.name for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    named = {**{a.name: v for a, v in zip(func._schema.arguments, args)}, **kwargs}
    return [v for name, v in named.items() if name not in written]


class _ZeroInputs(TorchDispatchMode):
    """Records every aten op called, and those given a float tensor that is entirely zero."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.on_zeros: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        tensors = [t for t in pytree.tree_leaves(_read_arguments(func, args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.is_floating_point() and t.numel() > 1 and torch.count_nonzero(t) == 0 for t in tensors):
            self.on_zeros.append(str(func))
        return func(*args, **kwargs)


def _ops_of_second_backward(inputs, activation: str, backend: str | None, how: str) -> _ZeroInputs:
    gx, _ = _first_grads(inputs, activation, backend)
    penalty = (gx**2).sum()
    with _ZeroInputs() as mode:
        if how == "grad":
            torch.autograd.grad(penalty, inputs[1])  # into w
        else:
            penalty.backward()
    return mode


@pytest.mark.parametrize("how", ["grad", "backward"])
@pytest.mark.parametrize("activation", ["lrelu", "relu"])
def test_second_backward_runs_no_op_on_zeros(pair, activation, how, seed):
    """autograd's own activation hands the penalty's double backward a zero tensor, carried back
    through the convolution below; the fused op's mask has no derivative, so no op sees zeros."""
    backend, device = pair
    ours = _ops_of_second_backward(_conv_inputs(seed, device), activation, backend, how)
    plain = _ops_of_second_backward(_conv_inputs(seed, device), activation, None, how)
    assert "aten.convolution.default" in ours.ops, f"the second backward ran no convolution: {ours.ops}"
    assert not ours.on_zeros, f"ops on an all-zero tensor: {ours.on_zeros} (seed {seed})"
    assert "aten.convolution_backward.default" in plain.on_zeros, f"the contrast saw no zeros: {plain.ops}"


def test_unrequested_bias_gradient_is_not_computed(pair):
    """autograd.grad w.r.t. x alone (the penalty's first backward) runs no bias reduction."""
    backend, device = pair
    x = torch.randn(2, 3, 4, 4, device=device, requires_grad=True)
    b = torch.randn(3, device=device, requires_grad=True)
    y = bias_act(x, b, activation="lrelu", backend=backend)
    with _ZeroInputs() as mode:
        torch.autograd.grad(y, x, torch.randn_like(y))
    assert not any("sum" in op for op in mode.ops), mode.ops


# ---------------------------------------------------------------- the op's contract


def test_custom_ops_pass_opcheck():
    """Schema and fake (meta) implementations of the Triton path's custom ops, as torch.compile uses them."""
    if _skip_reason("triton", "cpu"):
        pytest.skip("triton cannot run here")
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    b = torch.randn(3)
    for activation in ACTIVATIONS:
        torch.library.opcheck(bias_act_fwd, (x, b, activation, SLOPE), test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(bias_act_bwd, (torch.randn_like(x), x, activation, SLOPE),
                              test_utils=("test_schema", "test_faketensor"))


def test_compiles_to_the_custom_ops(seed):
    """Under torch.compile the Functions trace (fullgraph) into the custom ops, with equal results."""
    if _skip_reason("triton", "cpu"):
        pytest.skip("triton cannot run here")
    graphs, capture = aot_graph_capture()

    def f(x, b):
        return bias_act(x, b, activation="lrelu", slope=SLOPE, backend="triton")

    x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(3, requires_grad=True)
    gy = torch.randn(2, 3, 4, 4)
    y = torch.compile(f, backend=capture, fullgraph=True)(x, b)
    grads = torch.autograd.grad(y, (x, b), gy)
    y0 = f(x, b)
    grads0 = torch.autograd.grad(y0, (x, b), gy)
    assert y.is_contiguous(memory_format=torch.channels_last)
    for a, e in zip((y, *grads), (y0, *grads0)):
        assert torch.allclose(a, e, rtol=1e-6, atol=1e-6), f"compiled and eager differ (seed {seed})"
    text = "\n".join(graphs)
    assert "ehm_fast.bias_act_fwd" in text and "ehm_fast.bias_act_bwd" in text, text


def test_linear_without_bias_is_the_identity():
    x = torch.randn(2, 3)
    assert bias_act(x) is x


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(activation="gelu"), "activation must be one of"),
        (dict(activation="lrelu", slope=0.0), "slope > 0"),
        (dict(bias=torch.randn(4)), "bias must be"),
        (dict(x=torch.randn(3)), "shape \\[N, C, ...\\]"),
        (dict(x=torch.ones(2, 3, dtype=torch.long)), "floating-point x"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    x = kwargs.pop("x", torch.randn(2, 3))
    with pytest.raises(ValueError, match=message):
        bias_act(x, **kwargs)
