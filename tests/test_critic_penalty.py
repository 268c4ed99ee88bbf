"""The explicit gradient penalty (ehm_fast.nn.critic_penalty): equal to autograd's double backward
in float64 (value, input gradient, every parameter gradient), first-order correct by gradcheck,
within the low-precision error of autograd's own in float32 and bf16, the same EHM critic step
with the explicit_penalty lever on and off, a clear error for an unsupported critic, and the
critic step compiled whole by torch.compile."""


import pytest
import torch
from torch import nn

from ehm_fast.config import ConfigError, EHMConfig
from ehm_fast.ehm import EHM
from ehm_fast.models import CRITIC_NORMS, Critic, EHMModels
from ehm_fast.nn import LEVERS, LayerOptions, levers_for, parse_levers
from ehm_fast.nn.critic_penalty import gradient_penalty, penalty_and_gradients

from helpers import rel_err

EPS = 1e-8


def _seeded(tag: str) -> torch.Generator:
    seed = torch.initial_seed()
    print(f"{tag}: seed {seed}")
    return torch.Generator().manual_seed(seed)


def _critic(norm: str, gen: torch.Generator, width: int = 4, dtype: torch.dtype = torch.float64) -> Critic:
    """A 32 px critic on the plain layers with weights large enough that |g| is of order 1 (DCGAN's
    init gives |g| << 1, where every sample's (|g| - 1) has one sign) and norm affines away from 1, 0."""
    critic = Critic(32, 3, width, norm).to(dtype)
    critic.body.layers = LayerOptions(levers=frozenset())
    with torch.no_grad():
        for name, p in critic.named_parameters():
            scale = 0.3 if "weight" in name and p.dim() == 4 else 0.5
            base = 1.0 if "norms" in name and name.endswith("weight") else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen, dtype=dtype))
    return critic


def _input(batch: int, gen: torch.Generator, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    x = torch.randn(batch, 3, 32, 32, generator=gen, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _autograd_penalty(critic: Critic, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GP, g) by autograd's double backward, as EHM._gradient_penalty computes it."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    norm = torch.sqrt(g.pow(2).flatten(1).sum(1) + EPS)
    return (norm - 1).pow(2).mean(), g


def _gradients(gp: torch.Tensor, inputs: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor | None]:
    return list(torch.autograd.grad(gp, inputs, weight, allow_unused=True))


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("norm", CRITIC_NORMS)
def test_equals_double_backward_in_float64(norm, batch, channels_last):
    gen = _seeded("float64")
    critic = _critic(norm, gen)
    x = _input(batch, gen, torch.float64, channels_last).requires_grad_(True)
    params = list(critic.parameters())
    weight = torch.rand((), generator=gen, dtype=torch.float64) + 0.5  # grad_output != 1
    ref_gp, ref_g = _autograd_penalty(critic, x)
    ref = _gradients(ref_gp, params + [x], weight)
    gp, g_norm = gradient_penalty(critic, x, EPS)
    got = _gradients(gp, params + [x], weight)
    assert rel_err(gp, ref_gp) < 1e-13
    assert rel_err(g_norm, torch.sqrt(ref_g.pow(2).flatten(1).sum(1) + EPS)) < 1e-13
    names = [n for n, _ in critic.named_parameters()] + ["x_hat"]
    scale = max(r.abs().max().item() for r in ref if r is not None)
    for name, a, r in zip(names, got, ref):
        if r is None:  # the head bias: g does not depend on it
            assert a is None, name
            continue
        assert a.shape == r.shape and a.dtype == r.dtype, name
        # relative to the tensor's own size; gradients that are zero in exact arithmetic (the top
        # norm's shift, x_hat's without a norm) against the largest of the check
        assert (a - r).abs().max().item() <= 1e-12 * max(r.abs().max().item(), 1e-3 * scale), name
    # the autograd-free form: the same value, g and parameter gradients
    gp_free, g_free, grads = penalty_and_gradients(critic, x, EPS, weight=float(weight))
    assert rel_err(gp_free, ref_gp) < 1e-13 and rel_err(g_free, ref_g) < 1e-13
    for name, r in zip(names, ref):
        if name in grads:
            assert (grads[name] - r).abs().max().item() <= 1e-12 * max(r.abs().max().item(), 1e-3 * scale), name
    assert set(grads) == {n for n in names[:-1] if n != "head.bias"}


@pytest.mark.parametrize("norm", CRITIC_NORMS)
def test_first_order_gradient_by_gradcheck(norm):
    """The backward is the derivative of the forward (finite differences of GP itself), x_hat's
    gradient (the Hessian-vector product of f, non-zero only through the norm) included."""
    gen = _seeded("gradcheck")
    critic = _critic(norm, gen)
    x = _input(2, gen, torch.float64, False).requires_grad_(True)
    params = tuple(critic.parameters())

    def gp(x_hat, *_params):  # gradcheck perturbs the critic's parameters in place
        return gradient_penalty(critic, x_hat, EPS)[0]

    assert torch.autograd.gradcheck(gp, (x, *params), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16_autocast"])
@pytest.mark.parametrize("norm", CRITIC_NORMS)
def test_low_precision_within_autograds_own_error(norm, dtype):
    """float32 parameters and inputs, or bf16 autocast as the trainer runs it on a GPU: the error
    against float64 at most twice autograd's own double backward's in the same precision."""
    gen = _seeded("low precision")
    critic64 = _critic(norm, gen, width=8)
    x64 = _input(3, gen, torch.float64, False)
    ref_gp, _ = _autograd_penalty(critic64, x64)
    ref = _gradients(ref_gp, list(critic64.parameters()), torch.ones((), dtype=torch.float64))
    critic = _critic(norm, gen, width=8, dtype=torch.float32)
    critic.load_state_dict(critic64.state_dict())
    x = x64.float()
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    params = list(critic.parameters())
    with amp:
        auto_gp, _ = _autograd_penalty(critic, x)
        ours_gp, _ = gradient_penalty(critic, x, EPS)
    floor = 1e-6 if dtype == torch.float32 else 1e-3  # where autograd happens to round exactly
    assert rel_err(ours_gp, ref_gp) <= 2 * rel_err(auto_gp, ref_gp) + floor
    auto = _gradients(auto_gp, params, torch.ones(()))
    ours = _gradients(ours_gp, params, torch.ones(()))
    for name, a, o, r in zip([n for n, _ in critic.named_parameters()], auto, ours, ref):
        if r is None:
            assert a is None and o is None, name
            continue
        if r.abs().max() < 1e-12:  # zero in exact arithmetic
            continue
        assert o.dtype == torch.float32, name
        assert rel_err(o, r) <= 2 * rel_err(a, r) + floor, name


def _critic_gradients(levers: str, critic_norm: str, seed: int, channels_last: bool = False):
    """The critic closure's loss, metrics and parameter gradients at the initial weights (float32)."""
    torch.manual_seed(seed)
    models = EHMModels(image_size=32, channels=3, z_dim=8, width=8, critic_norm=critic_norm)
    step = EHM(models, EHMConfig(lipschitz="gp", estimator="importance", sleep_noise=True, n_critic=1,
                                 layer_levers=levers, channels_last=channels_last))
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    torch.manual_seed(seed + 1)
    with step._trainable(critic=True):
        loss, metrics = step._critic_closure(step._prepare(x))()
        loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in step.c_params]
    return {k: float(v) for k, v in metrics.items()}, grads


@pytest.mark.parametrize("base", ["none", "all"])
@pytest.mark.parametrize("critic_norm", CRITIC_NORMS)
def test_critic_step_with_the_lever_equals_the_double_backward(critic_norm, base):
    seed = torch.initial_seed() % 2**31
    print(f"seed {seed}")
    lever = "explicit_penalty" if base == "none" else "all,explicit_penalty"
    channels_last = base == "all"  # both runs alike: only the penalty differs between them
    ref_metrics, ref_grads = _critic_gradients(base, critic_norm, seed, channels_last)
    metrics, grads = _critic_gradients(lever, critic_norm, seed, channels_last)
    assert metrics.keys() == ref_metrics.keys()
    for key in ref_metrics:
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-6), key
    scale = max(g.abs().max().item() for g in ref_grads if g is not None)
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert (a is None) == (b is None), i
        if b is not None:  # float32 rounding of the largest gradient of the step
            assert (a - b).abs().max().item() <= 1e-5 * scale, i


def test_training_iteration_runs_with_the_lever():
    models = EHMModels(image_size=32, channels=3, z_dim=8, width=8, critic_norm="layer")
    step = EHM(models, EHMConfig(lipschitz="gp", n_critic=2, critic_schedule="constant",
                                 layer_levers="explicit_penalty"))
    metrics = step.step(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert metrics["gp"].item() > 0 and all(torch.isfinite(v).all() for v in metrics.values())


def test_unsupported_critics_are_refused():
    gen = _seeded("unsupported")
    x = torch.randn(2, 3, 32, 32, generator=gen)
    critic = Critic(32, 3, 4, "layer")
    critic.body.norms[1] = nn.BatchNorm2d(8)
    with pytest.raises(ValueError, match="critic norms"):
        gradient_penalty(critic, x, EPS)
    critic = Critic(32, 3, 4, "layer")
    critic.body.norms[2] = nn.GroupNorm(2, 16)
    with pytest.raises(ValueError, match="critic norms"):
        gradient_penalty(critic, x, EPS)
    critic = Critic(32, 3, 4)
    critic.body.convs[0] = nn.Conv2d(3, 4, 3, 2, 1, bias=False)
    with pytest.raises(ValueError, match="4x4/2/1"):
        gradient_penalty(critic, x, EPS)
    with pytest.raises(ValueError, match="models.Critic"):
        gradient_penalty(nn.Conv2d(3, 1, 32), x, EPS)


def test_the_lever_is_opt_in():
    assert "explicit_penalty" not in parse_levers("all") | levers_for("auto", "cuda") | parse_levers("-conv")
    assert parse_levers("all,explicit_penalty") == frozenset(LEVERS) | {"explicit_penalty"}
    assert parse_levers("explicit_penalty") == {"explicit_penalty"}
    with pytest.raises(ValueError, match="opt-in"):
        parse_levers("all,conv")


@pytest.mark.slow
def test_critic_step_compiles_whole_and_equals_eager():
    """torch.compile (Inductor, CPU) traces the critic closure with the explicit penalty and every
    other lever as one graph (no graph breaks: the profiler ranges and the zero-free convolutions'
    node tracing stand aside under compile), and its loss and gradients equal eager's."""
    seed = torch.initial_seed() % 2**31
    torch.manual_seed(seed)
    models = EHMModels(image_size=32, channels=3, z_dim=8, width=8, critic_norm="layer")
    step = EHM(models, EHMConfig(lipschitz="gp", n_critic=1, layer_levers="all,explicit_penalty"))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    closure = step._critic_closure(x)
    torch._dynamo.reset()
    with step._trainable(critic=True):
        explained = torch._dynamo.explain(closure)()
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        loss, metrics = closure()
        loss.backward()
        ref = [p.grad.clone() for p in step.c_params]
        for p in step.c_params:
            p.grad = None
        compiled_loss, compiled_metrics = torch.compile(closure)()
        compiled_loss.backward()
    torch._dynamo.reset()
    for key in metrics:
        assert compiled_metrics[key].item() == pytest.approx(metrics[key].item(), rel=1e-5, abs=1e-6), key
    scale = max(r.abs().max().item() for r in ref)
    for i, (p, r) in enumerate(zip(step.c_params, ref)):
        assert (p.grad - r).abs().max().item() <= 1e-5 * scale, i


def test_compile_needs_the_explicit_penalty():
    models = EHMModels(image_size=32, channels=1, z_dim=4, width=4)
    with pytest.raises(ConfigError, match="explicit_penalty"):
        EHM(models, EHMConfig(lipschitz="gp", compile=True, layer_levers="all"))
    EHM(models, EHMConfig(lipschitz="clip", compile=True))  # no penalty: nothing to differentiate twice


@pytest.mark.slow
def test_compiled_iterations_equal_eager():
    """--compile: both phases' closures under torch.compile give the eager iterations' losses."""
    seed = torch.initial_seed() % 2**31
    runs = []
    for compiled in (False, True):
        torch.manual_seed(seed)
        models = EHMModels(image_size=32, channels=1, z_dim=4, width=4)
        step = EHM(models, EHMConfig(n_critic=1, compile=compiled, layer_levers="all,explicit_penalty"))
        x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        runs.append([{k: float(v) for k, v in step.step(x).items()} for _ in range(2)])
    torch._dynamo.reset()
    for eager, compiled in zip(*runs):
        for key in eager:
            assert compiled[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-5), key
