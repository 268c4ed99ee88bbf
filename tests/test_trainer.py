"""The EHM training step, the ehm-train / ehm-sample command lines, checkpoints and resume."""

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ehm_fast import checkpoint as ckpt
from ehm_fast import runs, sample, train
from ehm_fast.config import TrainConfig
from ehm_fast.ehm import EHM
from ehm_fast.models import EHMModels
from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "4", "--critic-width", "4", "--z-dim", "4", "--batch-size", "8", "--n-critic", "1",
        "--log-every", "1", "--sample-every", "2", "--ckpt-every", "100", "--n-samples", "16", "--device", "cpu"]


def tiny_models(**kw):
    return EHMModels(image_size=32, channels=1, z_dim=4, width=4, **kw)


def real_batch(b=8):
    return torch.rand(b, 1, 32, 32) * 2 - 1


def assert_one_line_error(code, err):
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], err


# ---------------------------------------------------------------------- the step
VARIANTS = [
    {},
    {"estimator": "importance", "sleep_noise": True, "sleep_latent": "kl"},
    {"lipschitz": "clip", "likelihood": "bernoulli", "sleep_noise": True, "sleep_decoder_grad": False},
    {"likelihood": "laplace", "sleep_noise": True, "learn_scale": False},
]


@pytest.mark.parametrize("objective", ["ehm", "svae", "vae", "wgan-gp"])
@pytest.mark.parametrize("variant", range(len(VARIANTS)))
def test_objectives_train_with_finite_losses(objective, variant):
    kw = VARIANTS[variant]
    m = tiny_models(likelihood=kw.get("likelihood", "gaussian"), share_weights=variant % 2 == 1,
                    prior="vamp" if variant == 1 else "normal", vamp_components=3, norm="batch" if variant == 2 else "layer")
    ehm = EHM(m, objective=objective, n_critic=2, **kw)
    before = [p.detach().clone() for p in m.decoder.parameters()]
    for _ in range(3):
        metrics = ehm.step(iter([real_batch() for _ in range(ehm.batches_needed())]))
    assert metrics, "no metrics"
    for name, value in metrics.items():
        assert torch.isfinite(value).all(), (name, value)
    assert float(metrics["bad_steps"]) == 0
    assert "critic_loss" in metrics if objective != "vae" else "critic_loss" not in metrics
    assert "sleep_loss" in metrics if objective in ("ehm", "svae") else "sleep_loss" not in metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, m.decoder.parameters())), "the decoder did not move"
    assert ehm.step_count == 3


def test_laplace_sleep_draw_of_an_exact_zero_stays_finite(monkeypatch):
    """torch.rand returns exactly 0 once in 2^24 draws (about one step in six at batch 256, 64x64 RGB),
    and the Laplace inverse CDF of 0 is -inf; the step must neither produce nor skip a NaN."""
    ehm = EHM(tiny_models(likelihood="laplace"), likelihood="laplace", sleep_noise=True, n_critic=1)
    draw = ehm._draw_noise

    def with_extremes(like):
        noise = draw(like)
        noise[0, 0, :2, :2] = 0.0
        noise[1, 0, 0, 0] = 1.0 - 2.0**-24  # the largest value torch.rand can return
        return noise

    monkeypatch.setattr(ehm, "_draw_noise", with_extremes)
    x, log_p = ehm._sample_x(torch.zeros(2, 1, 32, 32), with_extremes(torch.empty(2, 1, 32, 32)))
    scale = ehm.models.decoder.log_scale.exp().item()
    assert torch.isfinite(x).all() and torch.isfinite(log_p).all()
    assert x[0, 0, 0, 0].item() == pytest.approx(-24 * math.log(2) * scale, rel=1e-5)  # the 2^-24 quantile
    for _ in range(2):
        metrics = ehm.step(iter([real_batch() for _ in range(ehm.batches_needed())]))
    assert all(torch.isfinite(v).all() for v in metrics.values()) and float(metrics["bad_steps"]) == 0


def test_bf16_autocast_and_channels_last_on_the_cpu():
    m = tiny_models(share_weights=True)
    ehm = EHM(m, amp=True, channels_last=True, n_critic=1, estimator="importance")
    assert m.encoder.body.convs[1].weight.is_contiguous(memory_format=torch.channels_last)
    assert m.decoder.weights[1] is m.encoder.body.convs[1].weight  # still tied after the format change
    metrics = ehm.step(real_batch())
    assert all(torch.isfinite(v).all() for v in metrics.values()) and float(metrics["bad_steps"]) == 0


def test_importance_estimator_reports_effective_sample_size():
    ehm = EHM(tiny_models(), estimator="importance", n_critic=1)
    metrics = ehm.step(real_batch())
    assert 1.0 <= float(metrics["ess"]) <= 8.0


def test_weight_clipping_bounds_the_critic():
    m = tiny_models()
    ehm = EHM(m, lipschitz="clip", clip_value=0.005, n_critic=2, lr_critic=0.1)
    ehm.step(real_batch())
    assert max(p.abs().max().item() for p in m.critic.parameters()) <= 0.005


def test_wgan_schedule():
    ehm = EHM(tiny_models(), critic_schedule="wgan", n_critic=5)
    counts = {}
    for s in (0, 24, 25, 499, 500, 501):
        ehm.step_count = s
        counts[s] = ehm.n_critic_now()
    assert counts == {0: 100, 24: 100, 25: 5, 499: 5, 500: 100, 501: 5}
    assert EHM(tiny_models(), objective="vae").batches_needed() == 1


def test_step_checks_the_number_of_batches():
    ehm = EHM(tiny_models(), n_critic=2)
    with pytest.raises(ValueError, match="needs 3 batches"):
        ehm.step([real_batch()])


def test_non_finite_steps_are_skipped_and_counted():
    m = tiny_models()
    ehm = EHM(m, n_critic=2)
    with torch.no_grad():
        m.critic.head.bias.fill_(float("nan"))  # every critic value, and so every loss, is NaN
    gen_before = [p.detach().clone() for p in m.generator_parameters()]
    critic_before = [p.detach().clone() for p in m.critic.parameters()]
    metrics = ehm.step(real_batch())
    assert float(metrics["bad_steps"]) == 3  # two critic steps and the generator step
    for a, b in zip(gen_before, m.generator_parameters()):
        assert torch.equal(a, b)
    for a, b in zip(critic_before, m.critic.parameters()):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def test_step_state_dict_round_trip():
    ehm = EHM(tiny_models(), n_critic=1)
    ehm.step(real_batch())
    other = EHM(tiny_models(), n_critic=1)
    other.load_state_dict(ehm.state_dict())
    assert other.step_count == 1
    for a, b in zip(ehm.models.state_dict().values(), other.models.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_iteration_trains_and_skips_on_device():
    torch.manual_seed(0)
    m = EHMModels(image_size=32, channels=1, z_dim=8, width=8).cuda()
    ehm = EHM(m, n_critic=2, cuda_graph=True)
    assert ehm.cuda_graph and ehm.amp and ehm.channels_last
    before = [p.detach().clone() for p in m.generator_parameters()]
    for _ in range(4):
        metrics = ehm.step(real_batch(16).cuda())
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert float(metrics["bad_steps"]) == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, m.generator_parameters()))
    with torch.no_grad():
        m.critic.head.bias.fill_(float("nan"))
    frozen = [p.detach().clone() for p in m.generator_parameters()]
    metrics = ehm.step(real_batch(16).cuda())
    assert float(metrics["bad_steps"]) == 3
    assert all(torch.equal(a, b) for a, b in zip(frozen, m.generator_parameters()))


# ---------------------------------------------------------------------- the command line
def test_default_style_run_leaves_grids_plot_metrics_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(train.main, [*TINY, "--steps", "3", "--out", str(out)], capsys)
    assert code == 0, err
    for name in ("samples_000002.png", "reconstructions_000002.png", "samples_final.png", "loss.png",
                 "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    # 16 samples of 32 px: 4 per row, 2 px gaps; 8 inputs and their 8 reconstructions below,
    # each row named in a margin on the left.
    assert Image.open(out / "samples_final.png").size == (2 + 4 * 34, 2 + 4 * 34)
    recons = np.asarray(Image.open(out / "reconstructions_final.png"))
    margin = recons.shape[1] - (2 + 8 * 34)
    assert recons.shape[0] == 2 + 2 * 34 and margin > 20
    for row in range(2):  # "input", then "reconstruction": text in the margin of each row
        assert recons[2 + row * 34 : 2 + row * 34 + 32, :margin].max() > 128
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["images_per_s"] > 0 for r in records)
    state = ckpt.load(out)
    assert state["step"] == 3 and state["config"]["width"] == 4 and "rng" in state and "data" in state


def _params(path):
    state = ckpt.load(path)
    return state["ehm"]["models"], state["ehm"]["opt_g"]["state"], state["data"], state["rng"]["torch"]


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, capsys):
    common = [*TINY, "--n-critic", "2", "--seed", "3"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cli(train.main, [*common, "--steps", "4", "--out", str(full)], capsys)[0] == 0
    assert run_cli(train.main, [*common, "--steps", "2", "--out", str(part)], capsys)[0] == 0
    assert run_cli(train.main, ["--resume", str(part), "--steps", "4"], capsys)[0] == 0
    m_full, o_full, d_full, r_full = _params(full)
    m_part, o_part, d_part, r_part = _params(part)
    assert m_full.keys() == m_part.keys()
    for k in m_full:
        assert torch.equal(m_full[k], m_part[k]), k
    for i in o_full:
        for k in o_full[i]:
            assert torch.equal(o_full[i][k], o_part[i][k]), (i, k)
    assert d_full == d_part and torch.equal(r_full, r_part)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_sigterm_mid_run_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "ehm_fast.train", *TINY, "--steps", "100000", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.time() < deadline, "the run did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM" in err
    state = ckpt.load(out)
    assert 1 <= state["step"] < 100000
    assert json.loads((out / "summary.json").read_text())["stopped_by"] == "SIGTERM"
    models, _ = train.load_models(out)
    assert models.decoder(torch.randn(2, 4)).shape == (2, 1, 32, 32)


def test_ehm_sample_draws_samples_and_reconstructions(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(train.main, [*TINY, "--steps", "1", "--out", str(out)], capsys)[0] == 0
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.new("L", (20, 24), color=40 * i).save(images / f"{i}.png")
    grid = tmp_path / "grid.png"
    code, err = run_cli(sample.main, ["--checkpoint", str(out / "checkpoint.pt"), "--n", "9", "--out", str(grid),
                                      "--reconstruct", str(images)], capsys)
    assert code == 0, err
    assert Image.open(grid).size == (2 + 3 * 34, 2 + 3 * 34)
    assert Image.open(tmp_path / "grid_recon.png").size == (2 + 3 * 34, 2 + 2 * 34)
    assert (train.load_generator, train.load_models) == (runs.load_generator, runs.load_models)  # the old names
    decoder, cfg = runs.load_generator(out)
    assert isinstance(cfg, TrainConfig) and decoder(torch.randn(5, cfg.z_dim)).shape == (5, 1, 32, 32)
    assert_one_line_error(*run_cli(sample.main, ["--checkpoint", str(tmp_path / "nope.pt")], capsys))


def test_folder_data_source(tmp_path, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        arr = (torch.rand(30, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / ("sub" if i % 2 else "") / f"{i}.png")
    out = tmp_path / "run"
    code, err = run_cli(train.main, [*TINY, "--steps", "2", "--data", f"folder:{folder}", "--out", str(out)], capsys)
    assert code == 0, err
    assert ckpt.load(out)["channels"] == 3


def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('objective = "vae"\n[model]\nwidth = 8\nz_dim = 6\n')
    cfg, state, _ = train.configure(["--config", str(toml), "--z-dim", "7", "--no-learn-scale"])
    assert (cfg.objective, cfg.width, cfg.z_dim, cfg.learn_scale, state) == ("vae", 8, 7, False, None)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("betas: [0.0, 0.99]\namp: false\nn_critic: 3\n")
    cfg, _, _ = train.configure(["--config", str(yaml)])
    assert (cfg.betas, cfg.amp, cfg.n_critic) == ((0.0, 0.99), False, 3)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--objective", "--estimator", "--n-critic", "--critic-schedule", "--lipschitz", "--sleep-latent",
                 "--no-amp", "--no-cuda-graph", "--no-channels-last", "--resume", "--config", "--data", "--optimizer"):
        assert flag in text, flag


# ---------------------------------------------------------------------- bad input
def test_missing_data_folder(tmp_path, capsys):
    code, err = run_cli(train.main, [*TINY, "--data", f"folder:{tmp_path / 'missing'}", "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err)
    assert "not found" in err and not (tmp_path / "r").exists()


def test_folder_of_unreadable_images(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    for i in range(8):
        (tmp_path / "d" / f"broken{i}.png").write_bytes(b"not a png at all")
    code, err = run_cli(train.main, [*TINY, "--data", f"folder:{tmp_path / 'd'}", "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err)
    assert "decodes as an image" in err and not (tmp_path / "r").exists()


def test_too_few_images_for_one_batch(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "one.png")
    code, err = run_cli(train.main, [*TINY, "--data", f"folder:{folder}", "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err)
    assert "fewer than one batch of 8" in err


def test_unknown_data_source(tmp_path, capsys):
    code, err = run_cli(train.main, [*TINY, "--data", "imagenet", "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err)
    assert "unknown data spec 'imagenet'" in err


def test_unsupported_image_size(tmp_path, capsys):
    assert_one_line_error(*run_cli(train.main, [*TINY, "--image-size", "48"], capsys))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("image_size: 48\n")
    code, err = run_cli(train.main, ["--config", str(cfg)], capsys)
    assert_one_line_error(code, err)
    assert "image_size" in err


def test_batch_smaller_than_device_count(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, err = run_cli(train.main, [*TINY, "--batch-size", "2", "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err)
    assert "does not divide among 4 processes" in err and "--batch-size 4" in err and not (tmp_path / "r").exists()


def _snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_corrupt_checkpoint_leaves_the_run_folder_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(train.main, [*TINY, "--steps", "1", "--out", str(out)], capsys)[0] == 0
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:500])  # truncated
    before = _snapshot(out)
    code, err = run_cli(train.main, ["--resume", str(out), "--steps", "5"], capsys)
    assert_one_line_error(code, err)
    assert "corrupt" in err
    assert _snapshot(out) == before


def test_fresh_run_refuses_a_folder_with_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(train.main, [*TINY, "--steps", "1", "--out", str(out)], capsys)[0] == 0
    before = _snapshot(out)
    code, err = run_cli(train.main, [*TINY, "--steps", "1", "--out", str(out)], capsys)
    assert_one_line_error(code, err)
    assert "--resume" in err and _snapshot(out) == before


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("widht: 8\n")
    code, err = run_cli(train.main, ["--config", str(cfg)], capsys)
    assert_one_line_error(code, err)
    assert "unknown config key 'widht'" in err and "width" in err
    assert_one_line_error(*run_cli(train.main, ["--widht", "8"], capsys))


def test_too_many_bad_steps_stop_with_a_message(tmp_path):
    cfg = TrainConfig(width=4, critic_width=4, z_dim=4, batch_size=8, n_critic=1, steps=50, log_every=2,
                      max_bad_steps=3, device="cpu", out=str(tmp_path / "r"), sample_every=100, ckpt_every=100)
    run = train.Run(cfg, None, None)
    with torch.no_grad():
        run.models.critic.head.bias.fill_(float("nan"))
    with pytest.raises(train.TrainingStopped, match="non-finite"):
        run.train()
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch, capsys):
    from ehm_fast import trainer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer.time, "strftime", lambda fmt: "20261203-101509")
    for _ in range(2):
        assert run_cli(train.main, [*TINY, "--steps", "1"], capsys)[0] == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20261203-101509", "20261203-101509-2"]
