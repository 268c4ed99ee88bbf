"""Distributed pieces on 2 gloo ranks over loopback (CPU)."""

import json
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


# ---------------------------------------------------------------------- ehm-train on 2 ranks
TINY = ["--width", "8", "--critic-width", "8", "--z-dim", "4", "--batch-size", "16", "--n-critic", "1",
        "--log-every", "1", "--sample-every", "100", "--ckpt-every", "100", "--n-samples", "4", "--device", "cpu",
        "--backend", "torch"]
STEPS = 4


def _stop_rank1_at(step):
    """SIGTERM to rank 1 alone after `step` steps, as a scheduler killing one process would."""
    import os
    import signal

    from ehm_fast.ehm import EHM

    original = EHM.step

    def step_then_signal(self, batches):
        out = original(self, batches)
        if self.rank == 1 and self.step_count == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    EHM.step = step_then_signal
    return lambda: setattr(EHM, "step", original)


def _train_cli(rank, world, root):
    import shutil

    import torch.distributed as dist

    from ehm_fast import train

    codes = {"full": train.main([*TINY, "--steps", str(STEPS), "--out", f"{root}/full"])}
    undo = _stop_rank1_at(2)
    codes["stopped"] = train.main([*TINY, "--steps", str(STEPS), "--out", f"{root}/stopped"])
    undo()
    if rank == 0:  # kept for the 1-process resume of this 2-process checkpoint
        shutil.copytree(f"{root}/stopped", f"{root}/stopped-copy")
    dist.barrier()
    codes["resumed"] = train.main(["--resume", f"{root}/stopped"])
    for opt in ("svrg", "storm"):
        codes[opt] = train.main([*TINY, "--steps", "3", "--optimizer", opt, "--snapshot-every", "2",
                                 "--snapshot-batches", "2", "--out", f"{root}/{opt}"])
    codes["sync-bn-cpu"] = train.main([*TINY, "--steps", "1", "--norm", "batch", "--sync-bn", "--out", f"{root}/bn"])
    torch.save(codes, f"{root}/codes-{rank}.pt")


def _models(run_dir):
    from ehm_fast import checkpoint as ckpt

    state = ckpt.load(run_dir)
    return state["step"], state["world_size"], state["ehm"]["models"]


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    run_ranks(_train_cli, str(root), timeout_s=150)
    return root


def test_ehm_train_on_two_ranks_writes_once_and_matches_one_process(cli_runs, capsys):
    from ehm_fast import train

    codes = [torch.load(cli_runs / f"codes-{r}.pt") for r in range(2)]
    assert codes[0] == codes[1]
    assert {k: v for k, v in codes[0].items() if k != "sync-bn-cpu"} == dict.fromkeys(
        ("full", "stopped", "resumed", "svrg", "storm"), 0)
    step, world, two = _models(cli_runs / "full")
    assert (step, world) == (STEPS, 2)
    records = _records(cli_runs / "full")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # rank 0 alone wrote them
    summary = json.loads((cli_runs / "full" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 16
    assert train.main([*TINY, "--steps", str(STEPS), "--out", str(cli_runs / "single")]) == 0
    _, _, one = _models(cli_runs / "single")
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert worst < 1e-5, worst


def test_a_signal_on_one_rank_stops_both_and_the_run_resumes_exactly(cli_runs):
    stopped = json.loads((cli_runs / "stopped-copy" / "summary.json").read_text())
    assert stopped["stopped_by"] == "SIGTERM" and stopped["step"] == 2
    assert _models(cli_runs / "stopped-copy")[0] == 2
    _, _, full = _models(cli_runs / "full")
    step, _, resumed = _models(cli_runs / "stopped")
    assert step == STEPS
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert [r["step"] for r in _records(cli_runs / "stopped")] == list(range(1, STEPS + 1))


def test_a_two_process_checkpoint_resumes_on_one_process(cli_runs):
    from ehm_fast import train

    with pytest.warns(RuntimeWarning, match="written by 2 process"):
        assert train.main(["--resume", str(cli_runs / "stopped-copy")]) == 0
    _, _, full = _models(cli_runs / "full")
    step, world, resumed = _models(cli_runs / "stopped-copy")
    assert (step, world) == (STEPS, 1)
    worst = max((full[k].float() - resumed[k].float()).abs().max().item() for k in full)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("opt", ["svrg", "storm"])
def test_variance_reduced_optimizers_train(cli_runs, tmp_path, opt):
    from ehm_fast import train

    assert train.main([*TINY, "--steps", "3", "--optimizer", opt, "--snapshot-every", "2", "--snapshot-batches",
                       "2", "--out", str(tmp_path / "one")]) == 0
    for run in (tmp_path / "one", cli_runs / opt):
        records = _records(run)
        assert len(records) == 3
        for r in records:
            assert all(math.isfinite(v) for v in r.values()), r
            assert r["bad_steps"] == 0


# ---------------------------------------------------------------------- bad set-ups
def test_sync_bn_on_cpu_ranks_is_a_clear_error(cli_runs):
    assert torch.load(cli_runs / "codes-0.pt")["sync-bn-cpu"] == 2


def test_a_batch_that_does_not_divide_among_the_processes(monkeypatch, capsys):
    from ehm_fast import train

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert train.main([*TINY, "--batch-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "does not divide among 3 processes" in err and "--batch-size 15 or 18" in err


def test_nccl_with_a_cpu_device_is_a_clear_error(monkeypatch):
    from ehm_fast import train

    monkeypatch.setattr(train.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(train.dist, "get_backend", lambda: "nccl")
    with pytest.raises(train.ConfigError, match="NCCL, which only moves CUDA tensors"):
        train._init_process_group(torch.device("cpu"), 2)
