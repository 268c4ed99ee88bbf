"""SVRG and STORM inside the EHM step: non-finite steps skipped, the joint reference point of the
two-player game (SVRE's estimator), batch-norm running statistics as a plain step leaves them."""

import copy

import pytest
import torch

from ehm_fast.ehm import EHM
from ehm_fast.models import EHMModels
from ehm_fast.optim import STORM, SVRG

OPTIMIZERS = ["adam", "svrg", "storm"]


def tiny_models(**kw):
    return EHMModels(image_size=32, channels=1, z_dim=4, width=4, **kw)


def real_batch(b=8):
    return torch.rand(b, 1, 32, 32) * 2 - 1


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_non_finite_steps_are_skipped_by_every_optimizer(optimizer):
    m = tiny_models()
    ehm = EHM(m, n_critic=2, optimizer=optimizer, snapshot_batches=2)
    ehm.step(real_batch())  # a first, finite iteration: SVRG has its snapshot, STORM its previous point
    with torch.no_grad():
        m.critic.head.bias.fill_(float("nan"))  # every critic value, and so every loss, is NaN
    gen_before = [p.detach().clone() for p in m.generator_parameters()]
    critic_before = [p.detach().clone() for p in m.critic.parameters()]
    states_before = [copy.deepcopy(opt.state_dict()["state"]) for opt in (ehm.opt_g, ehm.opt_c)]
    bad_before = float(ehm.bad_steps)
    metrics = ehm.step(real_batch())
    assert float(metrics["bad_steps"]) - bad_before == 3  # two critic steps and the generator step
    for a, b in zip(gen_before, m.generator_parameters()):
        assert torch.equal(a, b)
    for a, b in zip(critic_before, m.critic.parameters()):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    for before, opt in zip(states_before, (ehm.opt_g, ehm.opt_c)):
        after = opt.state_dict()["state"]
        for i in before:
            for k, v in before[i].items():
                if torch.is_tensor(v):
                    assert torch.equal(v.nan_to_num(), after[i][k].nan_to_num()), (optimizer, i, k)


def _game(x, y, a):
    """A two-player quadratic game on one sample a = (a1, a2, a3): x minimises l_x, y minimises l_y."""
    l_x = 0.5 * (x * x).sum() + (a[0] * x * y).sum() + (a[1] * x).sum()
    l_y = 0.5 * (y * y).sum() - (a[0] * x * y).sum() + (a[2] * y).sum()
    return l_x, l_y


def _grads(x, y, a):
    """(d l_x / dx, d l_y / dy) by hand."""
    return x + a[0] * y + a[1], y - a[0] * x + a[2]


def test_joint_snapshot_is_the_svre_estimator_on_a_quadratic_game():
    """SVRG with held = the other player equals the hand-written joint-snapshot recursion
    v = g(w, theta; a) - g(w~, theta~; a) + mu(w~, theta~) to float64 rounding, and differs from
    the own-weights variant, whose replay reads the other player's current weights."""
    torch.manual_seed(0)
    d, n, lr = 3, 6, 0.1
    data = torch.randn(n, 3, d, dtype=torch.float64)
    x = torch.randn(d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(d, dtype=torch.float64, requires_grad=True)
    xs, ys = x.detach().clone(), y.detach().clone()  # the hand-written recursion's iterates
    opt_x = SVRG([x], lr=lr, base="sgd", snapshot_every=3, snapshot_batches=n, held=[y])
    opt_y = SVRG([y], lr=lr, base="sgd", snapshot_every=3, snapshot_batches=n, held=[x])
    order = iter(range(10**6))

    def snapshot_closure(player):
        def closure():
            a = data[next(order) % n]  # the snapshot passes cycle through every sample once
            loss = _game(x, y, a)[player]
            loss.backward()
            return loss
        return closure

    def full_mean(xv, yv, player):
        return torch.stack([_grads(xv, yv, a)[player] for a in data]).mean(0)

    snap = {}
    for t in range(7):
        for player, (opt, own) in enumerate(((opt_x, x), (opt_y, y))):
            if opt.snapshot_due:
                opt.refresh_snapshot(snapshot_closure(player))
                snap[player] = (xs.clone(), ys.clone())
                assert torch.allclose(opt.state[own]["snapshot_mean"], full_mean(*snap[player], player), rtol=0, atol=1e-14)
            a = data[(3 * t + player) % n]

            def closure(a=a, player=player):
                loss = _game(x, y, a)[player]
                loss.backward()
                return loss

            opt.step(closure)
            g_now = _grads(xs, ys, a)[player]
            g_snap = _grads(*snap[player], a)[player]
            v = g_now - g_snap + full_mean(*snap[player], player)
            if player == 0:
                xs = xs - lr * v
            else:
                ys = ys - lr * v
            assert torch.allclose(own.detach(), xs if player == 0 else ys, rtol=0, atol=1e-13), (t, player)
    own_only = SVRG([x], lr=lr, base="sgd", snapshot_batches=n)
    own_only.refresh_snapshot(snapshot_closure(0))
    with torch.no_grad():
        y.add_(1.0)  # the other player moves after the snapshot
    before = x.detach().clone()
    a = data[0]

    def closure_x():
        loss = _game(x, y, a)[0]
        loss.backward()
        return loss

    own_only.step(closure_x)
    own_v = (before - x.detach()) / lr
    # g and g_snap cancel (both at the other's current weights): v is the snapshot mean under the
    # other's old weights, not an estimate of the gradient where the players are now
    assert torch.allclose(own_v, full_mean(before, y.detach() - 1.0, 0), rtol=0, atol=1e-13)


def test_storm_previous_point_holds_both_players():
    """STORM with held: the correction is the gradient at the previous point of both players."""
    torch.manual_seed(1)
    d, lr, a_mix = 2, 0.05, 0.3
    x = torch.randn(d, dtype=torch.float64, requires_grad=True)
    y = torch.randn(d, dtype=torch.float64, requires_grad=True)
    opt = STORM([x], lr=lr, a=a_mix, base="sgd", held=[y])
    samples = torch.randn(5, 3, d, dtype=torch.float64)
    xs, direction, prev = x.detach().clone(), None, None
    for t, a in enumerate(samples):
        def closure(a=a):
            loss = _game(x, y, a)[0]
            loss.backward()
            return loss

        opt.step(closure)
        g = _grads(xs, y.detach(), a)[0]
        direction = g if direction is None else g + (1 - a_mix) * (direction - _grads(*prev, a)[0])
        prev = (xs.clone(), y.detach().clone())
        xs = xs - lr * direction
        assert torch.allclose(x.detach(), xs, rtol=0, atol=1e-13), t
        with torch.no_grad():
            y.mul_(0.9).add_(0.1)  # the other player moves between this player's steps


def _bn_buffers(models):
    return {k: v.detach().clone() for k, v in models.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("optimizer", ["svrg", "storm"])
def test_replays_leave_batch_norm_statistics_as_a_plain_step(optimizer):
    """With lr = 0 the weights stay put, so a plain (Adam) run and a variance-reduced run make the
    same forward passes at the current weights: STORM (whose replay rewinds the RNG) must leave
    identical running statistics, and SVRG (whose snapshot passes draw new noise) the same count
    of batches tracked."""
    base = tiny_models(norm="batch")
    runs = {}
    for name in ("adam", optimizer):
        torch.manual_seed(5)
        m = copy.deepcopy(base)
        ehm = EHM(m, n_critic=1, optimizer=name, lr=0.0, lr_critic=0.0, snapshot_batches=3)
        batches = [real_batch() for _ in range(4)]
        ehm.step(batches[:2])
        ehm.step(batches[2:])
        runs[name] = _bn_buffers(m)
    assert runs["adam"], "the models have batch norm"
    for k, v in runs["adam"].items():
        if optimizer == "storm" or "num_batches" in k:
            assert torch.equal(v, runs[optimizer][k]), k
