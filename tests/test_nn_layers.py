"""The layers wired into the models and the training step: every lever keeps the step equal to the
plain torch.nn layers (fp32, CPU), the weight cache casts each weight once, options are checked."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ehm_fast.config import EHMConfig
from ehm_fast.ehm import EHM
from ehm_fast.models import EHMModels
from ehm_fast.nn import LEVERS, WeightCache, parse_levers


def _step_and_gradients(levers: str, norm: str, seed: int, share_weights: bool = False):
    """The critic's and the generator's gradients at the initial weights, the batch-norm buffers
    after them, then the losses of two iterations."""
    torch.manual_seed(seed)
    models = EHMModels(image_size=32, channels=3, z_dim=8, width=8, norm=norm, share_weights=share_weights)
    # The Jensen bound, not the importance estimate: its weights exp(f - log p(x|z)) turn float32
    # rounding of log p (thousands of nats over 3,072 pixels) into gradient differences up to
    # eps |log p| relative, too coarse to tell a lever's error from rounding (the estimators have
    # their own float64 tests)
    step = EHM(models, EHMConfig(lipschitz="gp", estimator="jensen", n_critic=1, layer_levers=levers))
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    torch.manual_seed(seed + 1)
    grads = {}
    for name, closure, params, critic in (("critic", step._critic_closure(x), step.c_params, True),
                                          ("generator", step._generator_closure(x), step.g_params, False)):
        with step._trainable(critic=critic):
            closure()[0].backward()
            grads[name] = [None if p.grad is None else p.grad.clone() for p in params]
            for p in params:
                p.grad = None
    buffers = [b.clone() for b in models.buffers()]
    losses = [{k: float(v) for k, v in step.step(x).items()} for _ in range(2)]
    return losses, grads, buffers


# Losses of the first iteration computed before any update reaches them; the rest follow an Adam
# step, whose first update is lr * sign(g): gradients equal to rounding but exactly zero in exact
# arithmetic (biases before a norm) take
# either sign, and the sleep loss weighs f by critic_weight = 100
BEFORE_ANY_UPDATE = ("critic_loss", "critic_gap", "gp", "wake_loss", "rec_nll", "rec_mse")


def _assert_losses_agree(losses, ref_losses):
    for it, (a, b) in enumerate(zip(losses, ref_losses)):
        for key in b:
            rel = 1e-5 if it == 0 and key in BEFORE_ANY_UPDATE else 1e-2
            assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-6), (it, key)


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("levers", ["all", *LEVERS])
def test_training_step_with_each_lever_equals_plain_layers(levers, norm):
    seed = torch.initial_seed() % 2**31
    print(f"seed {seed}")
    ref_losses, ref_grads, ref_buffers = _step_and_gradients("none", norm, seed)
    losses, grads, buffers = _step_and_gradients(levers, norm, seed)
    _assert_losses_agree(losses, ref_losses)
    for phase in ref_grads:
        scale = max(g.abs().max().item() for g in ref_grads[phase] if g is not None)
        for i, (a, b) in enumerate(zip(grads[phase], ref_grads[phase])):
            assert (a is None) == (b is None), (phase, i)
            if b is not None:  # float32 rounding of the largest gradient of the phase
                assert (a - b).abs().max().item() <= 1e-5 * scale, (phase, i)
    for a, b in zip(buffers, ref_buffers):  # batch-norm running statistics and counts
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tied_weights_step_with_all_levers_equals_plain_layers():
    seed = torch.initial_seed() % 2**31
    print(f"seed {seed}")
    ref, got = _step_and_gradients("none", "batch", seed, True), _step_and_gradients("all", "batch", seed, True)
    _assert_losses_agree(got[0], ref[0])


class _WeightCasts(TorchDispatchMode):
    """Counts casts of float32 tensors of the given shapes to bf16."""

    def __init__(self, shapes: set[tuple[int, ...]]) -> None:
        super().__init__()
        self.shapes, self.count = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is torch.ops.aten._to_copy and kwargs.get("dtype") == torch.bfloat16:
            src = args[0]
            if src.dtype == torch.float32 and tuple(src.shape) in self.shapes:
                self.count += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("cached", [False, True])
def test_weight_cache_casts_each_weight_once_per_step(cached):
    """bf16 autocast on the CPU: without the cache every use casts its weight again; with it the
    step engine's refreshes are the only copies (one multi-tensor copy, not a _to_copy)."""
    torch.manual_seed(0)
    models = EHMModels(image_size=32, channels=3, z_dim=8, width=8, norm="batch")
    levers = "all" if cached else "-weight_cache"
    step = EHM(models, EHMConfig(lipschitz="gp", n_critic=1, amp=True, layer_levers=levers))
    assert (step.weight_cache is not None) == cached
    shapes = {tuple(p.shape) for p in models.conv_parameters() if p.dim() == 4}
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with _WeightCasts(shapes) as casts:
        metrics = step.step(x)
    assert all(torch.isfinite(v) for v in metrics.values())
    if cached:
        assert casts.count == 0
    else:
        assert casts.count > 2 * len(shapes), casts.count


def test_weight_cache_follows_its_parameters_and_sends_gradients_to_them():
    w = torch.randn(4, 3, 2, 2, requires_grad=True)
    cache = WeightCache([w])
    with torch.no_grad():
        w.mul_(2)
    assert not torch.equal(cache.cast(w, torch.bfloat16).float(), w.detach().bfloat16().float())
    cache.refresh([w])
    cast = cache.cast(w, torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, w.detach().bfloat16())
    gy = torch.randn(4, 3, 2, 2)
    (cast.float() * gy).sum().backward()
    assert w.grad.dtype == torch.float32 and torch.allclose(w.grad, gy.bfloat16().float())
    other = torch.randn(3)
    assert cache.cast(other, torch.bfloat16).dtype == torch.bfloat16  # not cached: a plain cast


def test_levers_are_parsed_and_checked():
    assert parse_levers("all") == frozenset(LEVERS) and parse_levers("none") == frozenset()
    assert parse_levers("conv,bn_act") == {"conv", "bn_act"}
    assert parse_levers("-conv") == frozenset(LEVERS) - {"conv"}
    with pytest.raises(ValueError, match="layer lever must be one of"):
        parse_levers("winograd")
    from ehm_fast.config import ConfigError, TrainConfig, validate

    with pytest.raises(ConfigError, match="layer_levers"):
        validate(TrainConfig(layer_levers="conv,fast"))


def _convolutions_in_generator_loss(levers: str) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    models = EHMModels(image_size=32, channels=3, z_dim=8, width=8, norm="batch")
    step = EHM(models, EHMConfig(n_critic=1, layer_levers=levers))
    closure = step._generator_closure(torch.rand(4, 3, 32, 32) * 2 - 1)
    with Count():
        closure()
    return Count.calls


def test_merge_makes_fewer_larger_calls():
    """The merge lever: the decoder's wake and sleep passes as one call per layer, the sleep phase's
    critic and encoder first layers as one, each encoder's two heads as one."""
    decoder_layers = 1 + len(EHMModels(image_size=32, channels=3, z_dim=8, width=8).decoder.weights)
    saved = decoder_layers + 1 + 2  # decoder layers, first layers, heads (wake and sleep)
    assert _convolutions_in_generator_loss("none") - _convolutions_in_generator_loss("merge") == saved
