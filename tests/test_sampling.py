"""ehm_fast.sampling: AIS estimates of log Z, the fused MALA step, latent Langevin, ehm-sample --refine.

Statistical checks draw fresh inputs (tests/conftest.py seeds each test and names the seed of a
failure: EHM_TEST_SEED replays it); each tolerance is a multiple of the
standard error the same test measures (or of its exact value, where known), never a guess.
"""

import math
import os

import pytest
import torch
from PIL import Image
from torch import nn

from ehm_fast import sample, train
from ehm_fast.models import EHMModels
from ehm_fast.sampling import ais_log_partition, langevin_latent, linear_schedule, mala_step
from ehm_fast.sampling import langevin as langevin_module
from helpers import run_cli

HAS_CUDA = torch.cuda.is_available()
Z_SIGMAS = 5.0  # a statistical check fails at 5 standard errors (about 1 run in 1.7 million per check)


def gaussian(mean, scale):
    """log N(x; mean, diag scale^2) per row and its gradient."""
    mean, scale = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(scale, dtype=torch.float64)

    def log_density(x):
        d = x.shape[1]
        const = torch.log(scale).expand(d).sum() + 0.5 * d * math.log(2 * math.pi)
        return -(((x - mean) / scale) ** 2).sum(1) / 2 - const

    return log_density, lambda x: -(x - mean) / scale**2


def repeat_estimates(log_weights, repeats):
    """log Z_hat of each of `repeats` independent groups of chains."""
    m = log_weights.numel() // repeats
    return torch.logsumexp(log_weights.view(repeats, m), 1) - math.log(m)


def assert_unbiased_in_exp(log_z_hat, log_z, what):
    ratio = torch.exp(log_z_hat - log_z)
    se = ratio.std() / math.sqrt(ratio.numel())
    assert abs(ratio.mean() - 1) <= Z_SIGMAS * se, f"{what}: mean Z_hat/Z = {ratio.mean():.4f} +- {se:.4f}"


def rmse(log_z_hat, log_z):
    return (log_z_hat - log_z).pow(2).mean().sqrt().item()


# ---------------------------------------------------------------------- AIS on known normalisers
@pytest.mark.parametrize("d, shift, scale, step, repeats, m", [(2, 1.0, 0.6, 0.2, 60, 16), (256, 0.05, 0.95, 0.15, 40, 8)])
def test_ais_gaussian_unbiased_error_falls_with_k_and_beats_importance(d, shift, scale, step, repeats, m):
    log_z = 1.7
    target, target_grad = gaussian(torch.full((d,), shift), scale)
    proposal, proposal_grad = gaussian(torch.zeros(d), 1.0)

    def f(x):
        return target(x) + log_z

    def grad(x):
        return target_grad(x), proposal_grad(x)

    x0 = torch.randn(repeats * m, d, dtype=torch.float64)
    plain = repeat_estimates(f(x0) - proposal(x0), repeats)
    short = repeat_estimates(ais_log_partition(f, proposal, x0, grad, n_steps=4, step_size=step).log_weights, repeats)
    result = ais_log_partition(f, proposal, x0, grad, n_steps=32, step_size=step)
    long = repeat_estimates(result.log_weights, repeats)
    assert_unbiased_in_exp(long, log_z, f"AIS K=32, d={d}")
    assert_unbiased_in_exp(short, log_z, f"AIS K=4, d={d}")
    assert rmse(long, log_z) < rmse(short, log_z) < rmse(plain, log_z) * 1.5
    assert rmse(long, log_z) < 0.7 * rmse(plain, log_z), (rmse(long, log_z), rmse(plain, log_z))
    assert 0.2 < result.acceptance.mean() < 1
    # log_z is the logsumexp of all the chains' weights
    torch.testing.assert_close(result.log_z, torch.logsumexp(result.log_weights, 0) - math.log(repeats * m))


def test_ais_mixture_with_autograd_gradients():
    repeats, m, log_z = 60, 32, -0.8
    centres = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
    parts = [gaussian(c, s)[0] for c, s in zip(centres, (0.5, 0.7))]
    mix = torch.log(torch.tensor([0.3, 0.7]))

    def f(x):
        return torch.logsumexp(torch.stack([w + p(x.double()) for w, p in zip(mix, parts)]), 0) + log_z

    proposal = gaussian(torch.zeros(2), 3.0)[0]
    x0 = 3.0 * torch.randn(repeats * m, 2, dtype=torch.float64)
    plain = repeat_estimates(f(x0) - proposal(x0), repeats)
    result = ais_log_partition(f, proposal, x0, n_steps=16, step_size=0.1)
    ais = repeat_estimates(result.log_weights, repeats)
    assert_unbiased_in_exp(ais, log_z, "AIS on the mixture")
    assert rmse(ais, log_z) < rmse(plain, log_z)
    # the weighted final samples put the mixture's weight on each component
    w = result.weights()[0].double()
    right = (w * (result.x[:, 0] > 0)).sum()
    ess = result.weights()[1]
    assert abs(right - 0.7) <= Z_SIGMAS * math.sqrt(0.21 / ess), (right, ess)


def test_mala_leaves_a_gaussian_invariant():
    """f = log_proposal = log N(m, diag s^2): every pi_k is that Gaussian, the chain is plain MALA on
    it and every weight is 0. Unadjusted Langevin at this step size would inflate the variance of
    the narrowest coordinate (s = 0.6) by 1 / (1 - eps / (2 s^2)) = 3.6x: the MH correction matters."""
    m, mean, scale = 4000, torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.6, 1.0, 1.5])
    log_p, grad_p = gaussian(mean, scale)
    x0 = mean + scale * torch.randn(m, 3, dtype=torch.float64)
    result = ais_log_partition(log_p, log_p, x0, lambda x: (grad_p(x), grad_p(x)), n_steps=25, step_size=0.5)
    assert torch.all(result.log_weights == 0) and result.log_z == 0
    assert 0.3 < result.acceptance.mean() < 0.95
    x = result.x
    assert (x - x0).abs().sum(1).gt(0).float().mean() > 0.9  # the chains did move
    var = scale.double() ** 2
    assert torch.all((x.mean(0) - mean).abs() <= Z_SIGMAS * torch.sqrt(var / m))
    assert torch.all((x.var(0) - var).abs() <= Z_SIGMAS * var * math.sqrt(2 / m))


def test_adaptation_moves_acceptance_toward_target():
    d, m = 16, 400
    log_p, grad_p = gaussian(torch.zeros(d), 0.5)
    proposal, proposal_grad = gaussian(torch.zeros(d), 1.0)
    x0 = torch.randn(m, d, dtype=torch.float64)

    def grad(x):
        return grad_p(x), proposal_grad(x)

    fixed = ais_log_partition(log_p, proposal, x0, grad, n_steps=30, step_size=2.0)
    adapted = ais_log_partition(log_p, proposal, x0, grad, n_steps=30, step_size=2.0, adapt=True)
    assert fixed.acceptance.mean() < 0.2
    assert abs(adapted.acceptance.mean() - 0.57) < abs(fixed.acceptance.mean() - 0.57) - 0.2
    assert torch.all(adapted.step_size < 2.0) and torch.all(fixed.step_size == 2.0)
    # adapting during the chain leaves log Z_hat only approximately unbiased (docs/sampling.md):
    # its value is not compared here, only that it is an estimate
    assert torch.isfinite(adapted.log_z) and torch.isfinite(fixed.log_z)


def test_surrogate_value_and_critic_gradient():
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def f(x):
        return -0.5 * x.pow(2).sum(1) + x @ theta

    proposal = gaussian(torch.zeros(2), 1.0)[0]
    result = ais_log_partition(f, proposal, torch.randn(64, 2, dtype=torch.float64), n_steps=4, step_size=0.3)
    assert not result.x.requires_grad and not result.log_weights.requires_grad
    w, ess = result.weights()
    assert 1 <= ess <= 64 and torch.isclose(w.sum(), torch.tensor(1.0))
    loss = result.surrogate(f(result.x))
    (g,) = torch.autograd.grad(loss, theta)
    torch.testing.assert_close(loss.detach(), result.log_z)
    torch.testing.assert_close(g, (w.double()[:, None] * result.x).sum(0))  # d f / d theta = x


def test_custom_schedule_and_image_shaped_samples():
    x0 = torch.randn(8, 1, 3, 3)

    def f(x):
        return -x.pow(2).flatten(1).sum(1)

    proposal = gaussian(torch.zeros(9), 1.0)[0]
    result = ais_log_partition(f, lambda x: proposal(x.flatten(1).double()).float(), x0, n_steps=3,
                               step_size=torch.full((8,), 0.1), schedule=[0.0, 0.1, 0.5, 1.0])
    assert result.x.shape == x0.shape and result.x.dtype == torch.float32
    assert result.log_weights.shape == (8,) and torch.isfinite(result.log_z)
    torch.testing.assert_close(linear_schedule(4), torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_steps": 0}, ValueError, "n_steps"),
    ({"n_steps": 2.5}, ValueError, "n_steps"),
    ({"step_size": -0.1}, ValueError, "step_size"),
    ({"step_size": 0.0}, ValueError, "step_size"),
    ({"step_size": torch.ones(3)}, ValueError, "step_size"),
    ({"schedule": [0.0, 1.0]}, ValueError, "n_steps \\+ 1"),
    ({"schedule": [0.0, 0.7, 0.5, 1.0]}, ValueError, "without decreasing"),
    ({"schedule": [0.1, 0.5, 0.7, 1.0]}, ValueError, "b_0 = 0"),
    ({"target_acceptance": 1.5}, ValueError, "target_acceptance"),
    ({"x0": torch.zeros(0, 2)}, ValueError, "M >= 1"),
    ({"x0": torch.zeros(4, 2, dtype=torch.int64)}, TypeError, "floating-point"),
    ({"f": lambda x: x.sum()}, ValueError, "f must return shape \\(4,\\)"),
    ({"grad": lambda x: (x, x[:, :1])}, ValueError, "grad \\(of log_proposal\\)"),
])
def test_ais_bad_arguments(kwargs, error, match):
    args = {"f": lambda x: -x.pow(2).sum(1), "log_proposal": lambda x: -x.pow(2).sum(1), "x0": torch.randn(4, 2),
            "n_steps": 3, "step_size": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        ais_log_partition(args.pop("f"), args.pop("log_proposal"), args.pop("x0"), **args)


# ---------------------------------------------------------------------- the fused MALA step
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]


def mala_state(m, d, dtype, device):
    def t(*shape, low=None):
        v = torch.randn(*shape, dtype=dtype, device=device)
        return v if low is None else v.abs() * 0.05 + low
    return [t(m, d), t(m, d), t(m, d), t(m), t(m), t(m), t(m, low=0.01), t(m, low=0.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m, d", [(5, 3), (3, 2500), (1, 1), (4, 2048)])
@pytest.mark.parametrize("phase", ["first", "middle", "last"])
def test_mala_kernel_matches_reference(device, dtype, m, d, phase):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1")
    state = mala_state(m, d, dtype, device)
    proposal = None
    if phase != "first":
        x, eps = state[0], state[6]
        xp = x + torch.sqrt(2 * eps)[:, None] * torch.randn_like(x)
        log_u = torch.log(torch.rand(m, dtype=dtype, device=device))
        if dtype == torch.float32:  # fp32 decisions at the threshold could differ by rounding: force them
            log_u = torch.where(torch.rand_like(log_u) < 0.5, -math.inf, math.inf)
        fp = torch.randn(m, dtype=dtype, device=device)
        if m > 2:
            fp[1] = math.nan  # a NaN proposal is rejected with alpha 0
        proposal = (xp, torch.randn_like(x), torch.randn_like(x), fp, torch.randn(m, dtype=dtype, device=device),
                    log_u)
    noise = None if phase == "last" else torch.randn(m, d, dtype=dtype, device=device)
    ref_state, ker_state = [t.clone() for t in state], [t.clone() for t in state]
    ref = mala_step(*ref_state, proposal, noise, 0.3, 0.55, 0.7, 0.57, backend="torch")
    out = mala_step(*ker_state, proposal, noise, 0.3, 0.55, 0.7, 0.57, backend="triton")
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    names = ["x", "gf", "glp", "f", "lp", "log_w", "eps", "alpha_sum", "next proposal"]
    for name, r, k in zip(names, ref_state + [ref], ker_state + [out]):
        assert k.shape == r.shape and k.dtype == r.dtype, name
        assert torch.isfinite(k).all(), f"{name}: not every element written"
        torch.testing.assert_close(k, r, rtol=tol, atol=tol, msg=name)
    if proposal is not None and m > 2:
        assert torch.equal(ker_state[0][1], state[0][1]) and ker_state[7][1] == state[7][1]  # the NaN row: rejected


def test_ais_triton_backend_matches_torch():
    if os.environ.get("TRITON_INTERPRET") != "1" and not HAS_CUDA:
        pytest.skip("Triton cannot run here")
    device = "cuda" if HAS_CUDA else "cpu"
    target, target_grad = gaussian(torch.tensor([0.5, -0.5, 1.0, 0.0, 0.2]), 0.7)
    proposal, proposal_grad = gaussian(torch.zeros(5), 1.0)
    x0 = torch.randn(6, 5, dtype=torch.float64, device=device)
    seed = torch.randint(0, 2**31, ()).item()
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(seed)
        results.append(ais_log_partition(target, proposal, x0, lambda x: (target_grad(x), proposal_grad(x)), n_steps=3,
                                         step_size=0.4, adapt=True, backend=backend))
    for r, k in zip(*results):
        torch.testing.assert_close(k, r, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- Langevin in latent space
class Quadratic(nn.Module):
    """f(x) = -|x - a|^2 / 2 per row."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x):
        return -0.5 * (x - self.a).pow(2).sum(1)


def linear_gaussian(weight):
    """decoder z -> G z and critic -|x - a|^2/2: E(z) = |z|^2/2 + w |G z - a|^2/2, quadratic with
    Hessian A = I + w G^T G and minimiser A^-1 w G^T a."""
    k, out = 3, 5
    dec = nn.Linear(k, out, bias=False).double()
    a = torch.randn(out, dtype=torch.float64)
    g = dec.weight.detach()
    hessian = torch.eye(k, dtype=torch.float64) + weight * g.T @ g
    return dec, Quadratic(a), hessian, torch.linalg.solve(hessian, weight * g.T @ a)


def test_langevin_without_noise_descends_to_the_minimiser():
    dec, critic, _, z_star = linear_gaussian(2.0)
    z = langevin_latent(dec, critic, torch.randn(7, 3, dtype=torch.float64), 400, 0.05, critic_weight=2.0, noise=False)
    torch.testing.assert_close(z, z_star.expand(7, 3), rtol=1e-6, atol=1e-6)
    assert all(p.grad is None for p in dec.parameters())


def test_langevin_keeps_its_exact_stationary_gaussian():
    """The linear-Gaussian chain z' = (I - eta A) z + eta b + sqrt(2 eta) xi has the stationary law
    N(A^-1 b, (A - eta A^2 / 2)^-1) exactly: started there, it must stay there."""
    weight, eta, n = 1.5, 0.1, 4000
    dec, critic, hessian, z_star = linear_gaussian(weight)
    cov = torch.linalg.inv(hessian - eta * hessian @ hessian / 2)
    z0 = z_star + torch.randn(n, 3, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    z = langevin_latent(dec, critic, z0, 20, eta, critic_weight=weight)
    se_mean = torch.sqrt(torch.diagonal(cov) / n)
    assert torch.all((z.mean(0) - z_star).abs() <= Z_SIGMAS * se_mean)
    se_cov = torch.sqrt((torch.diagonal(cov)[:, None] * torch.diagonal(cov)[None] + cov**2) / n)
    assert torch.all((torch.cov(z.T) - cov).abs() <= Z_SIGMAS * se_cov)


def test_langevin_on_the_dcgan_models_lowers_the_energy():
    models = EHMModels(image_size=32, channels=1, z_dim=4, width=4).eval()
    z0 = torch.randn(6, 4)

    def energy(z):
        with torch.no_grad():
            return 0.5 * z.pow(2).sum(1) - 3.0 * models.critic(models.decoder(z))

    z = langevin_latent(models.decoder, models.critic, z0, 5, 1e-3, critic_weight=3.0, noise=False)
    assert z.shape == z0.shape and not z.requires_grad
    assert energy(z).mean() < energy(z0).mean()
    assert all(p.grad is None for p in models.parameters())


@pytest.mark.parametrize("args, match", [
    ((0, 0.1), "steps"), ((3, -0.1), "step size"), ((3, 0.0), "step size"), ((3, math.nan), "step size"),
])
def test_langevin_bad_arguments(args, match):
    dec, critic, _, _ = linear_gaussian(1.0)
    with pytest.raises(ValueError, match=match):
        langevin_latent(dec, critic, torch.randn(2, 3, dtype=torch.float64), *args)
    with pytest.raises(ValueError, match="critic weight"):
        langevin_latent(dec, critic, torch.randn(2, 3, dtype=torch.float64), 2, 0.1, critic_weight=-1.0)
    with pytest.raises(ValueError, match=r"\[B, k\]"):
        langevin_latent(dec, critic, torch.randn(3, dtype=torch.float64), 2, 0.1)
    with pytest.raises(ValueError, match="CUDA tensors"):
        langevin_latent(dec, critic, torch.randn(2, 3, dtype=torch.float64), 2, 0.1, cuda_graph=True)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_langevin_cuda_graph_matches_eager_and_is_reused():
    dec, critic, _, _ = linear_gaussian(1.0)
    dec, critic = dec.cuda(), Quadratic(critic.a.cuda())
    z0 = torch.randn(16, 3, dtype=torch.float64, device="cuda")
    eager = langevin_latent(dec, critic, z0, 10, 0.05, noise=False, cuda_graph=False)
    graphed = langevin_latent(dec, critic, z0, 10, 0.05, noise=False, cuda_graph=True)
    torch.testing.assert_close(graphed, eager)
    cached = len(langevin_module._GRAPHS)
    again = langevin_latent(dec, critic, z0 + 1, 10, 0.05, noise=False)
    assert len(langevin_module._GRAPHS) == cached
    torch.testing.assert_close(again, langevin_latent(dec, critic, z0 + 1, 10, 0.05, noise=False, cuda_graph=False))
    noisy = [langevin_latent(dec, critic, z0, 10, 0.05) for _ in range(2)]
    assert not torch.equal(*noisy)  # every replay draws fresh noise


# ---------------------------------------------------------------------- ehm-sample --refine
TINY = ["--width", "4", "--critic-width", "4", "--z-dim", "4", "--batch-size", "8", "--n-critic", "1",
        "--log-every", "1", "--sample-every", "100", "--ckpt-every", "100", "--n-samples", "4", "--device", "cpu"]


def assert_one_line_error(code, err, match):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and len(lines) == 1 and "error:" in lines[0], err
    assert match in lines[0], err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    assert train.main([*TINY, "--steps", "2", "--out", str(out)]) == 0
    return out


def test_ehm_sample_refine_langevin(checkpoint, tmp_path, capsys):
    out = tmp_path / "s.png"
    code, err = run_cli(sample.main, ["--checkpoint", str(checkpoint), "--n", "6", "--nrow", "3", "--out", str(out),
                                      "--refine", "langevin", "--refine-steps", "3", "--refine-step-size", "0.01",
                                      "--refine-compare"], capsys)
    assert code == 0, err
    assert "after 3 Langevin steps" in err
    plain = tmp_path / "p.png"
    assert run_cli(sample.main, ["--checkpoint", str(checkpoint), "--n", "6", "--nrow", "3", "--out", str(plain)],
                   capsys)[0] == 0
    refined, before = Image.open(out), Image.open(plain)
    assert refined.size == before.size and refined.tobytes() != before.tobytes()
    compare = Image.open(tmp_path / "s_refine.png")
    assert compare.size[0] == refined.size[0] and compare.size[1] > refined.size[1]  # rows before and after


@pytest.mark.parametrize("flags, match", [
    (["--refine", "langevin", "--refine-steps", "0"], "steps"),
    (["--refine", "langevin", "--refine-step-size", "-0.5"], "step size"),
    (["--refine", "langevin", "--refine-critic-weight", "nan"], "critic weight"),
    (["--refine-steps", "5"], "--refine-steps needs --refine langevin"),
    (["--refine", "hmc"], "invalid choice"),
])
def test_ehm_sample_refine_bad_arguments(flags, match, tmp_path, capsys):
    code, err = run_cli(sample.main, ["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "s.png"),
                                      *flags], capsys)
    assert_one_line_error(code, err, match)

