"""Distributed pieces on 2 gloo ranks over loopback (CPU)."""

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
