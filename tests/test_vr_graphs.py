"""SVRG and STORM as the whole-iteration CUDA graph needs them: once their state exists an
iteration reads nothing back to the host, the capture's warm-up is undone exactly (the held
player's reference values included), and on a GPU the graph replays equal eager iterations."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ehm_fast.ehm import EHM
from ehm_fast.engine import IterationGraphs
from ehm_fast.models import EHMModels

OPTIMIZERS = ["adam", "svrg", "storm"]


def tiny_models(device="cpu"):
    return EHMModels(image_size=32, channels=1, z_dim=4, width=4).to(device)


def real_batches(count, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 1, 32, 32, generator=g) * 2 - 1).to(device) for _ in range(count)]


class HostReads(TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (.item(), bool(), float())."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _ehm(optimizer, device="cpu", **kw):
    torch.manual_seed(0)
    return EHM(tiny_models(device), n_critic=2, optimizer=optimizer, snapshot_every=3, snapshot_batches=2, **kw)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_steady_iteration_reads_nothing_back_to_the_host(optimizer):
    """What a CUDA graph needs (on the GPU a read would be a sync, and fails under capture): after
    the first iteration, which creates the optimizers' state, none of the iteration's ops (both
    phases, every replay of SVRG/STORM, their non-finite checks and skips) copies a value back,
    on finite steps and on skipped ones."""
    ehm = _ehm(optimizer)
    first, *rest = real_batches(3, seed=1)
    ehm.step(first)
    assert optimizer == "adam" or all(opt.ready() for opt in (ehm.opt_g, ehm.opt_c))
    reads = HostReads()
    with reads:
        ehm._iteration([ehm._prepare(x) for x in rest], 1)
    assert reads.count == 0
    with torch.no_grad():
        ehm.models.critic.head.bias.fill_(float("nan"))
    with reads:
        metrics = ehm._iteration([ehm._prepare(x) for x in rest], 1)
    assert reads.count == 0 and float(metrics["bad_steps"]) == 2


@pytest.mark.parametrize("optimizer", ["svrg", "storm"])
def test_warm_up_before_capture_is_undone_exactly(optimizer):
    """IterationGraphs runs warm-up iterations before it captures and restores every tensor of
    `_state_tensors` after them: with SVRG/STORM (per-parameter state, the other player's
    reference values, step counts on the device) three undone iterations leave no trace."""
    plain, warmed = _ehm(optimizer), _ehm(optimizer)
    first, *later = real_batches(3, seed=2)
    for ehm in (plain, warmed):
        torch.manual_seed(1)
        ehm.step(first)
    saved = {k: v.detach().clone() for k, v in warmed._state_tensors()}
    for _ in range(3):
        warmed._iteration([warmed._prepare(x) for x in later], 1)
    IterationGraphs(warmed._iteration, warmed._state_tensors, [warmed.opt_g, warmed.opt_c])._restore(saved)
    for ehm in (plain, warmed):
        torch.manual_seed(3)
        ehm._iteration([ehm._prepare(x) for x in later], 1)
    for (name, a), (_, b) in zip(plain._state_tensors(), warmed._state_tensors()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_graph_iterations_equal_eager_iterations(optimizer):
    """The same iterations, captured and replayed or run eagerly (fp32, no autocast: equal to
    float32 rounding, relative to each tensor's size)."""
    runs = {}
    for graph in (False, True):
        ehm = _ehm(optimizer, "cuda", cuda_graph=graph, amp=False)
        torch.manual_seed(4)
        batches = real_batches(6 * 3, seed=5, device="cuda")
        for i in range(6):  # SVRG's snapshot comes due at iteration boundaries twice
            ehm.step(batches[3 * i:3 * i + 3])
        assert ehm.cuda_graph == graph and (not graph or ehm.graphs._graphs)
        runs[graph] = [p.detach().clone() for p in ehm.models.parameters()]
    for a, b in zip(runs[False], runs[True]):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max().clamp_min(1e-3)


@pytest.mark.parametrize("objective", ["ehm", "svae", "wgan-gp"])
def test_ehm_closures_draw_nothing_themselves(objective):
    """Why EHM's SVRG/STORM replays need no RNG rewind (replay_rng=False): a phase's closure draws
    its noise when it is built, so evaluating it twice gives the same loss and gradients."""
    ehm = EHM(tiny_models(), n_critic=1, optimizer="storm", objective=objective)
    x = ehm._prepare(real_batches(1, seed=6)[0])
    for critic, make, params in ((True, ehm._critic_closure, ehm.c_params),
                                 (False, ehm._generator_closure, ehm.g_params)):
        closure = make(x)
        with ehm._trainable(critic=critic):
            runs = []
            for _ in range(2):
                loss, _ = closure()
                runs.append([loss.detach(), *torch.autograd.grad(loss, params, allow_unused=True)])
        for a, b in zip(*runs):
            assert (a is None and b is None) or torch.equal(a, b), critic
