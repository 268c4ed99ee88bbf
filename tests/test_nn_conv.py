"""The zero-free convolutions (ehm_fast.nn.conv): equal to F.conv2d / conv_transpose2d in every
direction and order, and the gradient penalty's double backward through the critic runs no
convolution on an all-zero tensor."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from ehm_fast.models import Critic
from ehm_fast.nn import conv2d, conv_transpose2d

from helpers import rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
# (batch, in channels, out channels, size, kernel, stride, padding): DCGAN's 4x4/2/1 at even and
# odd sizes (odd ones need an output_padding in the input gradient), a head, a 3x3/1/1
GEOMETRIES = [(2, 3, 5, 8, 4, 2, 1), (1, 4, 3, 7, 4, 2, 1), (3, 6, 1, 4, 4, 1, 0), (2, 2, 3, 5, 3, 1, 1)]


def _seeded(tag: str) -> torch.Generator:
    seed = torch.initial_seed()
    print(f"{tag}: seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_and_its_transpose_equal_torch_in_float64(geometry, device):
    b, cin, cout, s, k, stride, pad = geometry
    g = _seeded("conv2d")
    f64 = dict(dtype=torch.float64, device=device)
    x = torch.randn(b, cin, s, s + 1, generator=g).to(**f64).requires_grad_()
    w = torch.randn(cout, cin, k, k, generator=g).to(**f64).requires_grad_()
    bias = torch.randn(cout, generator=g).to(**f64).requires_grad_()
    y, ref = conv2d(x, w, bias, stride, pad), F.conv2d(x, w, bias, stride, pad)
    torch.testing.assert_close(y, ref)
    gy = torch.randn(ref.shape, generator=g).to(**f64)
    got = torch.autograd.grad(y, (x, w, bias), gy)
    want = torch.autograd.grad(ref, (x, w, bias), gy)
    for a, e, name in zip(got, want, ("x", "weight", "bias")):
        assert a.shape == e.shape and rel_err(a, e) < 1e-12, name
    h = torch.randn(ref.shape, generator=g).to(**f64).requires_grad_()
    wt = w.detach().clone().requires_grad_()
    out_pad = x.shape[-1] - F.conv_transpose2d(h, wt, None, stride, pad).shape[-1]
    bt = torch.randn(cin, generator=g).to(**f64).requires_grad_()
    up = conv_transpose2d(h, wt, bt, stride, pad, out_pad)
    up_ref = F.conv_transpose2d(h, wt, bt, stride, pad, out_pad)
    torch.testing.assert_close(up, up_ref)
    gu = torch.randn(up_ref.shape, generator=g).to(**f64)
    for a, e in zip(torch.autograd.grad(up, (h, wt, bt), gu), torch.autograd.grad(up_ref, (h, wt, bt), gu)):
        assert a.shape == e.shape and rel_err(a, e) < 1e-12


@pytest.mark.parametrize("geometry", [(1, 2, 3, 6, 4, 2, 1), (1, 2, 2, 5, 4, 2, 1)], ids=lambda g: "x".join(map(str, g)))
def test_second_derivatives_by_gradgradcheck(geometry):
    b, cin, cout, s, k, stride, pad = geometry
    g = _seeded("gradgradcheck")
    x = torch.randn(b, cin, s, s, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(cout, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: conv2d(*a, stride, pad), (x, w, bias))
    assert torch.autograd.gradgradcheck(lambda *a: conv2d(*a, stride, pad), (x, w, bias), fast_mode=True)
    h = torch.randn(b, cout, s, s, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda h, w: conv_transpose2d(h, w, None, stride, pad), (h, w), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_and_channels_last_keep_dtype_and_format(dtype, channels_last):
    g = _seeded("formats")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 5, 9, 9, generator=g).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(7, 5, 4, 4, generator=g) * 0.2).to(dtype).requires_grad_()
    y = conv2d(x, w, None, 2, 1)
    ref = F.conv2d(x.double(), w.double(), None, 2, 1)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=fmt) or y.shape[-1] == 1
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(y, ref) < tol
    gy = torch.randn(y.shape, generator=g).to(dtype)
    gx, gw = torch.autograd.grad(y, (x, w), gy)
    rx, rw = torch.autograd.grad(ref, (x, w), gy.double())
    assert gx.dtype == gw.dtype == dtype and rel_err(gx, rx) < tol and rel_err(gw, rw) < tol


def test_bad_input_is_refused():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 5, 4, 4)
    with pytest.raises(ValueError, match="channels"):
        conv2d(x, w)
    with pytest.raises(ValueError, match="4-d"):
        conv2d(x[0], w)
    with pytest.raises(ValueError, match="square"):
        conv2d(x, torch.randn(4, 3, 3, 4))


class _ZeroConvolutions(TorchDispatchMode):
    """Counts convolution calls (forward or backward) with an all-zero tensor among their
    arguments, and their FLOPs by torch's own FLOP formulas."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.numel() > 1]
            if any(torch.count_nonzero(t) == 0 for t in tensors):
                self.calls += 1
                self.flops += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


def _penalty_pass(critic: Critic, x: torch.Tensor) -> None:
    """The critic half of a gradient penalty step: f(x), g = df/dx with a graph, d|g|^2/dparams."""
    x = x.clone().requires_grad_(True).view_as(x)  # a non-leaf: FlopCounterMode's hooks need one
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    g.pow(2).sum().backward()


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_penalty_double_backward_runs_no_convolution_on_zeros(norm):
    """With norm "none" (the critic's default) the zero path lies below every activation; a layer
    norm has a true second derivative, so there it is only the activations' share that goes."""
    g = _seeded("zero path")
    x = torch.randn(3, 3, 32, 32, generator=g)
    counts, flops = {}, {}
    for levers in ("none", "all"):
        critic = Critic(32, 3, width=8, norm=norm)
        critic.body.layers.levers = frozenset() if levers == "none" else critic.body.layers.levers
        with _ZeroConvolutions() as zeros, FlopCounterMode(display=False) as counter:
            _penalty_pass(critic, x)
        counts[levers], flops[levers] = (zeros.calls, zeros.flops), counter.get_total_flops()
    # the plain layers do run them (so the count can see them), the levers none
    if norm == "none":
        assert counts["none"][0] >= len(critic.body.convs), counts  # one below each activation
    assert counts["all"] == (0, 0), counts
    # and the FLOPs fall by at least those calls' share (plain autograd also differentiates the
    # head's double backward w.r.t. its incoming gradient, a constant of f.sum())
    assert flops["none"] - flops["all"] >= counts["none"][1], (flops, counts)
    print(f"penalty pass FLOPs: plain {flops['none']:.3g}, ehm_fast.nn {flops['all']:.3g} "
          f"({1 - flops['all'] / flops['none']:.1%} fewer)")


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_penalty_parameter_gradients_equal_autograd_on_plain_layers(norm):
    g = _seeded("penalty gradients")
    x = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    grads = {}
    for levers in ("none", "all"):
        torch.manual_seed(0)
        critic = Critic(32, 3, width=4, norm=norm).double()
        if levers == "none":
            critic.body.layers.levers = frozenset()
        _penalty_pass(critic, x)
        grads[levers] = [p.grad for p in critic.parameters()]
    for a, e in zip(grads["all"], grads["none"]):
        if e is None:  # the head's bias: no term of the penalty depends on it
            assert a is None
        else:
            assert rel_err(a, e) < 1e-11
