"""The Triton convolution kernels (ehm_fast.kernels.conv) and their wiring as the "triton" kernel of
ehm_fast.nn.conv: float64 agreement with F.conv2d / conv_transpose2d and their gradients at odd
shapes, bf16 error against PyTorch's own bf16 error, the epilogues' statistics against
torch.var_mean, gradgradcheck through the zero-free chain, the custom ops under torch.compile,
and the benchmark family's CPU smoke run. On the CPU the kernels run in the Triton interpreter
(slow: tiny shapes); the CUDA cases are listed always and skipped without a GPU."""

import pytest
import torch
import torch.nn.functional as F
from conftest import _skip_reason
from helpers import aot_graph_capture, poisoned_memory, rel_err

from ehm_fast.nn import conv2d, conv_transpose2d
from ehm_fast.nn.layers import LayerOptions

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
# (batch, in channels, out channels, input size, kernel, stride, padding): DCGAN's 4x4/2/1 at even
# and odd sizes (odd ones: unequal phases, an output_padding in the input gradient), a stride-1
# head and a 3x3/1/1
GEOMETRIES = [(3, 16, 24, 8, 4, 2, 1), (1, 3, 16, 5, 4, 2, 1), (3, 24, 3, 5, 4, 1, 0), (1, 16, 16, 5, 3, 1, 1)]


@pytest.fixture(autouse=True)
def _needs_triton(request):
    device = request.node.callspec.params.get("device", "cpu") if hasattr(request.node, "callspec") else "cpu"
    reason = _skip_reason("triton", device)
    if reason:
        pytest.skip(reason)


def _kernels():
    from ehm_fast.kernels import conv

    return conv


def _seeded(tag: str) -> torch.Generator:
    seed = torch.initial_seed()
    print(f"{tag}: seed {seed}")
    return torch.Generator().manual_seed(seed)


def _draw(g, shape, dtype, device, channels_last=True, scale=1.0):
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t


def _reference_grads(x, w, bias, gy, stride, pad):
    """(y, dx, dw, db) of F.conv2d in float64 by autograd."""
    x, w, bias = (t.detach().double().requires_grad_() for t in (x, w, bias))
    y = F.conv2d(x, w, bias, stride, pad)
    return (y.detach(), *torch.autograd.grad(y, (x, w, bias), gy.double()))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("device", DEVICES)
def test_every_kernel_matches_float64_torch(geometry, device):
    b, cin, cout, s, k, stride, pad = geometry
    K = _kernels()
    g = _seeded("float64")
    f64 = {"dtype": torch.float64, "device": device}
    channels_last = cin != 3  # both layouts: the kernels take any strides
    x = _draw(g, (b, cin, s, s), **f64, channels_last=channels_last)
    w = _draw(g, (cout, cin, k, k), **f64, channels_last=False)
    bias = _draw(g, (cout,), **f64)
    oh = (s + 2 * pad - k) // stride + 1
    gy = _draw(g, (b, cout, oh, oh), **f64, channels_last=channels_last)
    y_ref, dx_ref, dw_ref, _ = _reference_grads(x, w, bias, gy, stride, pad)
    with poisoned_memory(y_ref.shape, x.shape, dtype=torch.float64, device=device):
        y = K.conv_fwd(x, w, bias, stride, pad)[0]
        dx = K.conv_dgrad(gy, w, None, stride, pad, (s, s))[0]
    for split in (1, 2):  # split-K: fp32/fp64 partials summed in a fixed order
        dw = K.conv_wgrad(gy, x, w, stride, pad, split=split)
        assert dw.shape == w.shape and rel_err(dw, dw_ref) < 1e-12, f"weight grad, split {split}"
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(dx, dx_ref) < 1e-12
    # the transposed convolution's forward is the input-gradient kernel, with a bias
    bt = _draw(g, (cin,), **f64)
    up = K.conv_dgrad(gy, w, bt, stride, pad, (s, s))[0]
    out_pad = s - F.conv_transpose2d(gy, w, None, stride, pad).shape[-1]
    assert rel_err(up, F.conv_transpose2d(gy, w, bt, stride, pad, out_pad)) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_error_at_most_twice_torchs(device):
    """Against float64 on the bf16-rounded inputs: fp32 accumulation and one rounding, as PyTorch's
    own bf16 convolution (whose error is the yardstick; a small floor for lucky draws)."""
    K = _kernels()
    g = _seeded("bf16")
    b, cin, cout, s = 3, 24, 16, 8
    x = _draw(g, (b, cin, s, s), torch.bfloat16, device)
    w = _draw(g, (cout, cin, 4, 4), torch.bfloat16, device, scale=0.2)
    bias = _draw(g, (cout,), torch.bfloat16, device)
    gy = _draw(g, (b, cout, s // 2, s // 2), torch.bfloat16, device)
    ref = _reference_grads(x, w, bias, gy, 2, 1)
    ours = (K.conv_fwd(x, w, bias, 2, 1)[0], K.conv_dgrad(gy, w, None, 2, 1, (s, s))[0],
            K.conv_wgrad(gy, x, w, 2, 1, split=2))
    xt, wt, bt = (t.detach().requires_grad_() for t in (x, w, bias))
    yt = F.conv2d(xt, wt, bt, 2, 1)
    theirs = (yt, *torch.autograd.grad(yt, (xt, wt), gy))
    for name, a, t, e in zip(("forward", "input grad", "weight grad"), ours, theirs, ref):
        assert a.dtype == torch.bfloat16
        mine, torchs = rel_err(a, e), rel_err(t, e)
        print(f"{name}: ours {mine:.2e}, torch {torchs:.2e}")
        assert mine <= max(2 * torchs, 2**-8), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_epilogues_bias_activation_and_statistics(dtype, device):
    """act(conv + bias) and the (mean, M2) of that result, for the forward (lrelu) and the
    transposed forward (relu) at an odd output size (phases of unequal size, a partial tile)."""
    K = _kernels()
    g = _seeded("epilogue")
    x = _draw(g, (3, 16, 9, 9), dtype, device)
    w = _draw(g, (24, 16, 4, 4), dtype, device, scale=0.2)
    bias = _draw(g, (24,), dtype, device)
    h = _draw(g, (3, 24, 4, 4), dtype, device)
    wt = _draw(g, (24, 16, 4, 4), dtype, device, scale=0.2)
    bt = _draw(g, (16,), dtype, device)
    xd, wd, bd, hd, wtd, btd = (t.double() for t in (x, w, bias, h, wt, bt))
    cases = [
        (K.conv_fwd(x, w, bias, 2, 1, "lrelu", 0.2, True), F.leaky_relu(F.conv2d(xd, wd, bd, 2, 1), 0.2)),
        (K.conv_dgrad(h, wt, bt, 2, 1, (9, 9), "relu", 0.2, True),
         F.relu(F.conv_transpose2d(hd, wtd, btd, 2, 1, output_padding=1))),
    ]
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # statistics of the fp32 values, before rounding
    for (y, mean, m2), ref in cases:
        assert rel_err(y, ref) < (1e-12 if dtype == torch.float64 else 2**-7)
        var, mean_ref = torch.var_mean(ref, dim=(0, 2, 3), correction=0)
        rows = ref.numel() // ref.shape[1]
        assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert rel_err(mean, mean_ref) < tol and rel_err(m2 / rows, var) < tol


def test_gradgradcheck_through_the_zero_free_chain():
    """Second derivatives of nn.conv with the Triton kernels in every direction (float64)."""
    g = _seeded("gradgradcheck")
    x = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda *a: conv2d(*a, 2, 1, kernel="triton"), (x, w, bias), fast_mode=True)
    h = torch.randn(1, 3, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda h, w: conv_transpose2d(h, w, None, 2, 1, kernel="triton"), (h, w),
                                        fast_mode=True)


def test_layers_select_the_kernels_and_equal_cudnn():
    """LayerOptions.conv_kernel = "triton": the critic's gradient-penalty pass (first and second
    derivatives through every layer) equals the cudnn path in float64."""
    from ehm_fast.models import Critic

    g = _seeded("layers")
    x = torch.randn(1, 3, 32, 32, generator=g, dtype=torch.float64)
    grads = {}
    for kernel in ("cudnn", "triton"):
        torch.manual_seed(0)
        critic = Critic(32, 3, width=4).double()
        critic.body.layers = LayerOptions(levers=frozenset(), conv_kernel=kernel)  # the kernel alone selects nn.conv
        xr = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(critic(xr).sum(), xr, create_graph=True)
        gx.pow(2).sum().backward()
        grads[kernel] = [p.grad for p in critic.parameters()]
    for a, e in zip(grads["triton"], grads["cudnn"]):
        assert (a is None) == (e is None)
        if e is not None:
            assert rel_err(a, e) < 1e-11


def test_custom_ops_pass_opcheck():
    from ehm_fast.nn.conv import conv_dgrad_op, conv_fwd_op, conv_wgrad_op

    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 4, 4)
    b = torch.randn(8)
    utils = ("test_schema", "test_faketensor")
    for stats in (False, True):
        torch.library.opcheck(conv_fwd_op, (x, w, b, 2, 1, "lrelu", 0.2, stats), test_utils=utils)
        torch.library.opcheck(conv_dgrad_op, (torch.randn(2, 8, 3, 3), w, None, 2, 1, 6, 6, "linear", 0.2, stats),
                              test_utils=utils)
    torch.library.opcheck(conv_wgrad_op, (torch.randn(2, 8, 3, 3), x, w, 2, 1), test_utils=utils)


def test_compiles_to_the_custom_ops():
    """torch.compile (fullgraph) traces forward, input and weight gradients into the custom ops."""
    graphs, capture = aot_graph_capture()

    def f(x, w, b):
        return conv2d(x, w, b, 2, 1, kernel="triton")

    g = _seeded("compile")
    x = torch.randn(1, 16, 4, 4, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(16, 16, 4, 4, generator=g).requires_grad_()
    b = torch.randn(16, generator=g).requires_grad_()
    gy = torch.randn(1, 16, 2, 2, generator=g)
    y = torch.compile(f, backend=capture, fullgraph=True)(x, w, b)
    got = (y, *torch.autograd.grad(y, (x, w, b), gy))
    y0 = f(x, w, b)
    want = (y0, *torch.autograd.grad(y0, (x, w, b), gy))
    for a, e in zip(got, want):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-5)
    text = "\n".join(graphs)
    for op in ("conv_fwd", "conv_dgrad", "conv_wgrad"):
        assert f"ehm_fast.{op}" in text, text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_capture_replays_the_kernels():
    """Tuned before the capture (the warm-up), then captured and replayed with new inputs."""
    g = _seeded("cuda graph")
    x = _draw(g, (8, 64, 16, 16), torch.bfloat16, "cuda").requires_grad_()
    w = _draw(g, (128, 64, 4, 4), torch.bfloat16, "cuda", scale=0.05).requires_grad_()

    def step():
        y = conv2d(x, w, None, 2, 1, kernel="triton")
        return torch.autograd.grad(y.float().square().sum(), (x, w))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    with torch.no_grad():
        x.copy_(torch.randn_like(x))
    graph.replay()
    for a, e in zip(out, step()):
        assert torch.equal(a, e)


def test_bad_arguments_are_refused():
    K = _kernels()
    x, w = torch.randn(1, 4, 6, 6), torch.randn(8, 4, 4, 4)
    with pytest.raises(ValueError, match="conv kernel"):
        conv2d(x, w, None, 2, 1, kernel="winograd")
    with pytest.raises(ValueError, match="dtype"):
        K.conv_fwd(x, w.double(), None, 2, 1)
    with pytest.raises(ValueError, match="channels"):
        K.conv_fwd(torch.randn(1, 5, 6, 6), w, None, 2, 1)
    with pytest.raises(ValueError, match="activation"):
        K.conv_fwd(x, w, None, 2, 1, activation="tanh")
    with pytest.raises(ValueError, match="bias"):
        K.conv_fwd(x, w, torch.randn(4), 2, 1)


def test_benchmark_family_runs_quick_on_the_cpu(monkeypatch, capsys):
    """bench_kernels' conv family at its --quick size (timings cut to one repetition: a smoke run)."""
    import benchmarks.bench_kernels as bench

    monkeypatch.setattr(bench, "median_time_us", lambda fn, device: (fn(), 1.0)[1])
    bench.main(["--quick", "--family", "conv", "--device", "cpu", "--no-save"])
    out = capsys.readouterr().out
    assert "matmul peak" in out
    for direction in ("forward", "input grad", "weight grad", "transposed forward"):
        assert f"{direction} | ehm:triton" in out and f"{direction} | eager" in out, out
    assert "n/a" not in out, out
