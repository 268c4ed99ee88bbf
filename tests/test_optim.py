"""SVRG, STORM, the closure-replay helpers and gradient_variance."""

import copy

import pytest
import torch
from torch import nn

from ehm_fast import _backend
from ehm_fast.optim import STORM, SVRG, evaluate, evaluate_at, gradient_variance
from ehm_fast.optim import functional as F

BACKENDS = ["torch"] + (["cpu"] if _backend.cpu_built() else [])


class NoisyNet(nn.Module):
    """BatchNorm, dropout and noise draws: everything the replay must reproduce."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x):
        return self.net(x + 0.1 * torch.randn_like(x))


def gp_closure(model, data, batch=8):
    """A WGAN-GP-like critic loss: random batch, noisy forward, interpolation draws, double backward."""

    def closure():
        idx = torch.randint(0, data.shape[0], (batch,))
        real, fake = data[idx], torch.randn(batch, data.shape[1], dtype=data.dtype)
        e = torch.rand(batch, 1, dtype=data.dtype)
        mix = (e * real + (1 - e) * fake).requires_grad_(True)
        (g,) = torch.autograd.grad(model(mix).sum(), mix, create_graph=True)
        loss = model(fake).mean() - model(real).mean() + 10 * ((g.norm(dim=1) - 1) ** 2).mean()
        loss.backward()
        return loss

    return closure


def lsq_problem(n=256, d=12):
    a = torch.randn(n, d)
    b = a @ torch.randn(d) + 0.1 * torch.randn(n)
    w = nn.Parameter(torch.zeros(d))

    def closure():
        idx = torch.randint(0, n, (8,))
        loss = ((a[idx] @ w - b[idx]) ** 2).mean()
        loss.backward()
        return loss

    return w, closure


def test_replay_same_gradient_with_batchnorm_noise_and_gp():
    model, data = NoisyNet(), torch.randn(64, 6)
    closure, params = gp_closure(model, data), list(model.parameters())
    _, g1, rng = evaluate(closure, params)
    g1 = [g.clone() for g in g1]
    buffers = [b.clone() for b in model.buffers()]
    after_first = torch.get_rng_state()
    _, g2 = evaluate_at(closure, params, [p.detach().clone() for p in params], rng, modules=[model])
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    for a, b in zip(buffers, model.buffers()):  # BatchNorm statistics untouched by the replay
        assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), after_first)  # the replay consumed no randomness
    for p, g in zip(params, g1):  # .grad is the first evaluation's
        assert torch.equal(p.grad, g)


def test_replay_at_other_values_matches_a_copy():
    model, data = NoisyNet(), torch.randn(64, 6)
    params = list(model.parameters())
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    _, _, rng = evaluate(gp_closure(model, data), params)
    values = [p.detach().clone() for p in other.parameters()]
    before = [p.detach().clone() for p in params]
    _, got = evaluate_at(gp_closure(model, data), params, values, rng, modules=[model])
    rng.restore()
    for p in other.parameters():
        p.grad = None
    gp_closure(other, data)()
    for g, p in zip(got, other.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7)
    for a, b in zip(before, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_svrg_at_snapshot_steps_along_mu(backend):
    """With the snapshot equal to the current parameters, v = mu_snap exactly: the step is the
    backend's plain SGD step with mu_snap as the gradient, bit for bit."""
    model, data = NoisyNet(), torch.randn(64, 6)
    closure = gp_closure(model, data)
    opt = SVRG(model.parameters(), lr=0.1, base="sgd", snapshot_batches=3, modules=[model], backend=backend)
    opt.refresh_snapshot(closure)
    before = [p.detach().clone() for p in model.parameters()]
    mus = [opt.state[p]["snapshot_mean"] for p in model.parameters()]
    opt.step(closure)
    F.cv_sgd_(before, mus, None, None, None, alpha=0.0, lr=0.1, backend=backend)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("base", ["adam", "adamw", "sgd"])
def test_storm_a1_is_torch_optim(base):
    """a = 1 makes STORM the plain base rule: same trajectory as torch.optim, param groups included."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    ref = copy.deepcopy(net)
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    kw = dict(momentum=0.9, weight_decay=0.01) if base == "sgd" else dict(weight_decay=0.01)
    groups = lambda m: [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.03}]  # noqa: E731
    ours = STORM(groups(net), lr=0.01, a=1.0, base=base, **kw)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[base]
    theirs = cls(groups(ref), lr=0.01, foreach=False, **kw)
    for _ in range(5):
        def closure(m=net):
            loss = ((m(x) - y) ** 2).mean()
            loss.backward()
            return loss
        ours.step(closure)
        theirs.zero_grad()
        closure(ref)
        theirs.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6)


def _run(opt, closure, steps, seed):
    torch.manual_seed(seed)
    for _ in range(steps):
        opt.step(closure)


@pytest.mark.parametrize("make", ["svrg", "storm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_is_bit_identical(make, dtype):
    model, data = NoisyNet().to(dtype), torch.randn(64, 6, dtype=dtype)

    def build(m):
        if make == "svrg":
            return SVRG(m.parameters(), lr=1e-2, base="adamw", weight_decay=0.01, snapshot_every=2,
                        snapshot_policy="random", snapshot_batches=2, snapshot_closure=gp_closure(m, data),
                        modules=[m])
        return STORM(m.parameters(), lr=1e-2, a=0.3, base="sgd", momentum=0.9, nesterov=True, modules=[m])

    opt = build(model)
    _run(opt, gp_closure(model, data), 4, seed=1)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _run(opt, gp_closure(model, data), 4, seed=2)

    twin = NoisyNet().to(dtype)
    twin.load_state_dict(saved_model)
    twin_opt = build(twin)
    twin_opt.load_state_dict(saved_opt)
    state = twin_opt.state[next(twin.parameters())]
    assert all(v.dtype == torch.float32 for k, v in state.items() if k in ("exp_avg", "direction", "snapshot_mean"))
    _run(twin_opt, gp_closure(twin, data), 4, seed=2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.buffers(), twin.buffers()):
        assert torch.equal(a, b)


def test_gradient_variance_svrg_below_plain():
    w, closure = lsq_problem()
    snapshot = [w.detach() + 0.01 * torch.randn_like(w)]
    result = gradient_variance(closure, [w], snapshot, num_batches=32)
    assert result.plain > 0
    assert result.ratio < 0.05


def test_gradient_variance_from_optimizers():
    w, closure = lsq_problem()
    svrg = SVRG([w], lr=0.05, base="sgd", snapshot_batches=32)
    svrg.refresh_snapshot(closure)
    for _ in range(3):
        svrg.step(closure)
    assert gradient_variance(closure, None, svrg, num_batches=16).ratio < 1.0
    storm = STORM([w], lr=0.01, a=0.2, base="sgd")
    for _ in range(3):
        storm.step(closure)
    assert gradient_variance(closure, None, storm, num_batches=16).ratio < 1.0


def test_svrg_converges_on_least_squares():
    w, closure = lsq_problem()
    opt = SVRG([w], lr=0.05, base="sgd", snapshot_every=20, snapshot_batches=32, snapshot_closure=closure)
    for _ in range(200):
        opt.step(closure)
    losses = [closure().item() for _ in range(20)]
    assert sum(losses) / 20 < 0.1  # the noise floor is 0.01; zero parameters start near 12


def test_svrg_periodic_refresh_counts():
    w, closure = lsq_problem()
    calls = []

    def snap():
        calls.append(1)
        return closure()

    opt = SVRG([w], lr=0.01, base="sgd", snapshot_every=3, snapshot_batches=2, snapshot_closure=snap)
    for _ in range(7):
        opt.step(closure)
    assert len(calls) == 2 * 3  # before steps 1, 4 and 7


def test_svrg_distributed_mean(tmp_path):
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        w, closure = lsq_problem()
        opt = SVRG([w], lr=0.01, base="sgd", snapshot_batches=4)
        torch.manual_seed(3)
        opt.refresh_snapshot(closure)
        mu = opt.state[w]["snapshot_mean"].clone()
    finally:
        dist.destroy_process_group()
    torch.manual_seed(3)
    total = torch.zeros_like(w)
    for _ in range(4):
        w.grad = None
        closure()
        total += w.grad
    torch.testing.assert_close(mu, total / 4)


def test_error_no_closure_and_no_snapshot():
    w, closure = lsq_problem()
    opt = SVRG([w], lr=0.1)
    with pytest.raises(RuntimeError, match="no snapshot"):
        opt.step(closure)
    opt.refresh_snapshot(closure)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="needs a closure"):
        STORM([w], lr=0.1).step()


def test_error_closure_without_loss_leaves_everything():
    w, closure = lsq_problem()
    opt = STORM([w], lr=0.1, a=0.5)
    opt.step(closure)
    before_w = w.detach().clone()
    before_state = copy.deepcopy(opt.state_dict())
    calls = []

    def second_call_fails():
        calls.append(1)
        loss = closure()
        return None if len(calls) == 2 else loss  # the replay at w_{t-1} returns nothing

    with pytest.raises(RuntimeError, match="returned no loss"):
        opt.step(second_call_fails)
    assert torch.equal(w.detach(), before_w)
    after = opt.state_dict()
    for k, v in before_state["state"][0].items():
        assert torch.equal(after["state"][0][k], v)


def test_error_sparse_gradients():
    emb = nn.Embedding(10, 3, sparse=True)

    def closure():
        loss = emb(torch.tensor([1, 2])).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="sparse gradients"):
        STORM(emb.parameters(), lr=0.1).step(closure)


def test_error_hyperparameters():
    w = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="base must be one of"):
        SVRG([w], base="rmsprop")
    with pytest.raises(ValueError, match="a must be in"):
        STORM([w], a=0.0)
    with pytest.raises(ValueError, match="snapshot_every"):
        SVRG([w], snapshot_every=0)
    with pytest.raises(ValueError, match="nesterov"):
        STORM([w], base="sgd", nesterov=True)


def test_add_param_group():
    w, closure = lsq_problem()
    extra = nn.Parameter(torch.randn(3))

    def both():
        loss = closure()
        penalty = (extra ** 2).sum()
        penalty.backward()
        return loss + penalty.detach()

    svrg = SVRG([w], lr=0.01, base="sgd")
    svrg.refresh_snapshot(closure)
    svrg.add_param_group({"params": [extra], "lr": 0.1})
    with pytest.raises(RuntimeError, match="no snapshot"):
        svrg.step(both)
    svrg.refresh_snapshot(both, num_batches=2)
    svrg.step(both)
    storm = STORM([w], lr=0.01)
    storm.step(closure)
    storm.add_param_group({"params": [extra]})
    before = extra.detach().clone()
    storm.step(both)
    assert not torch.equal(before, extra.detach())
