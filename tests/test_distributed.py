"""Distributed pieces on 2 gloo ranks over loopback (CPU)."""

import math

import pytest
import torch

from dist_utils import run_ranks
from ehm_fast import distributed, losses


def _global_estimate(rank, world, path, scores, log_p):
    m = scores.shape[0] // world
    own_s = scores[rank * m:(rank + 1) * m].clone().requires_grad_()
    own_p = log_p[rank * m:(rank + 1) * m].clone().requires_grad_()
    est = distributed.global_log_partition(own_s, own_p, backend="torch")
    est.backward()
    torch.save({"est": est.detach(), "gs": own_s.grad, "gp": own_p.grad}, f"{path}/rank{rank}.pt")


def test_global_log_partition_equals_single_process(tmp_path):
    scores, log_p = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    run_ranks(_global_estimate, str(tmp_path), scores, log_p)
    s, p = scores.clone().requires_grad_(), log_p.clone().requires_grad_()
    single = losses.log_partition(s, p, backend="torch")
    single.backward()
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for part in parts:
        torch.testing.assert_close(part["est"], single.detach())
    # each rank's own samples get world_size * w_i; DDP's averaging divides by world_size
    torch.testing.assert_close(torch.cat([q["gs"] for q in parts]) / 2, s.grad)
    torch.testing.assert_close(torch.cat([q["gp"] for q in parts]) / 2, p.grad)


def test_single_process_is_plain_log_partition():
    s = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(distributed.global_log_partition(s, backend="torch"),
                               losses.log_partition(s, backend="torch"))
    assert distributed.current().world_size == 1 and distributed.current().is_main


# ---------------------------------------------------------------------- the EHM step under DDP
B = 4  # per rank; the single process takes 2 * B
STEP_CONFIGS = {  # name: (EHM options, iterations)
    "gp": ({}, 3),  # default: Jensen estimator, gradient penalty (double backward through DDP)
    "wgan-gp": ({"objective": "wgan-gp"}, 3),  # encoder and log_scale untrained: left out of DDP
    "svrg": ({"optimizer": "svrg", "snapshot_every": 2, "snapshot_batches": 2}, 3),
    "storm": ({"optimizer": "storm"}, 3),
    # one iteration: later ones amplify the fp32 rounding of log p(x~|z) (~700 for 1024 pixels)
    "importance": ({"estimator": "importance", "likelihood": "bernoulli"}, 1),
    "importance-local": ({"estimator": "importance", "likelihood": "bernoulli", "local_log_partition": True}, 1),
}


def _global_batches(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2 * B, 1, 32, 32, generator=g) * 2 - 1 for _ in range(n)]


def _train_steps(rank, world, path, names):
    """Each config from the same seeds; rank r gets the r-th slice of every global batch (the
    single process, world 1, the whole batch), SVRG's snapshots included."""
    from ehm_fast.ehm import EHM
    from ehm_fast.models import EHMModels

    def mine(x):
        return x if world == 1 else x[rank * B:(rank + 1) * B]

    for name in names:
        kw, iterations = STEP_CONFIGS[name]
        torch.manual_seed(0)
        m = EHMModels(image_size=32, channels=1, z_dim=4, width=8, critic_width=8, norm="layer",
                      likelihood=kw.get("likelihood", "gaussian"))
        ehm = EHM(m, n_critic=2, backend="torch", batch_source=map(mine, _global_batches(2, 100)), **kw)
        data = iter(_global_batches(1, 3 * iterations))
        for _ in range(iterations):
            metrics = ehm.step([mine(next(data)) for _ in range(ehm.batches_needed())])
        torch.save({"params": [p.detach().clone() for p in m.parameters()],
                    "metrics": {k: float(v) for k, v in metrics.items()}}, f"{path}/{name}-{rank}-{world}.pt")


@pytest.fixture(scope="module")
def step_runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("steps")
    run_ranks(_train_steps, str(path), list(STEP_CONFIGS), timeout_s=120)
    _train_steps(0, 1, str(path), list(STEP_CONFIGS))
    return {(name, r, w): torch.load(path / f"{name}-{r}-{w}.pt") for name in STEP_CONFIGS for r, w in
            ((0, 2), (1, 2), (0, 1))}


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a["params"], b["params"]))


@pytest.mark.parametrize("name", list(STEP_CONFIGS))
def test_parameters_identical_on_both_ranks(step_runs, name):
    r0, r1 = step_runs[name, 0, 2], step_runs[name, 1, 2]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert all(math.isfinite(v) for v in r0["metrics"].values()), r0["metrics"]
    assert r0["metrics"]["bad_steps"] == 0


@pytest.mark.parametrize("name", ["gp", "wgan-gp", "svrg", "storm", "importance"])
def test_two_ranks_of_batch_b_match_one_process_of_batch_2b(step_runs, name):
    single, ranks = step_runs[name, 0, 1], step_runs[name, 0, 2]
    start = [p.detach() for p in _initial_params(name)]
    moved = max((a - b).abs().max().item() for a, b in zip(single["params"], start))
    assert moved > 1e-4  # training did change the weights
    # fp32 summation order differs (one batch of 2B vs two of B, then an average); Adam turns it
    # into far less than one step (lr 2e-4) of difference, a missed reduction into whole steps
    assert _max_diff(single, ranks) < 1e-5, _max_diff(single, ranks)


def _initial_params(name):
    from ehm_fast.models import EHMModels

    torch.manual_seed(0)
    kw = STEP_CONFIGS[name][0]
    return list(EHMModels(image_size=32, channels=1, z_dim=4, width=8, critic_width=8, norm="layer",
                          likelihood=kw.get("likelihood", "gaussian")).parameters())


def test_local_log_partition_is_a_different_estimate(step_runs):
    """--local-log-partition takes the logsumexp over each rank's samples only: unlike the global
    estimate it does not reproduce the single process."""
    single = step_runs["importance", 0, 1]
    assert _max_diff(single, step_runs["importance-local", 0, 2]) > 100 * _max_diff(single, step_runs["importance", 0, 2])
