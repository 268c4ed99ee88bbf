"""FID/KID through torchmetrics with a tiny feature extractor standing in for Inception."""

import numpy as np
import pytest
import torch
from torch import nn

from ehm_fast import fid
from ehm_fast.data import Digits, prepare
from ehm_fast.data.synthetic import make_lsun


KID = {"kid_subsets": 10, "kid_subset_size": 200}  # torchmetrics' default 100 x 1000 takes seconds


class TinyFeatures(nn.Module):
    """A fixed random conv + pooling: uint8 [B, 3, H, W] -> [B, 16]."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return torch.tanh(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))


def batches(images: np.ndarray, size: int = 100):
    return [torch.from_numpy(images[a : a + size]) for a in range(0, len(images), size)]


@pytest.fixture(scope="module")
def digits():
    return Digits(16, 3).images[:800]


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(digits):
    net = TinyFeatures()
    same = fid.compute_fid(batches(digits), batches(digits), feature=net, **KID)
    assert net.calls == 16
    noise = torch.randint(0, 256, digits.shape, dtype=torch.uint8)
    far = fid.compute_fid(batches(digits), noise.split(100), feature=net, **KID)
    halves = fid.compute_fid(batches(digits[::2]), batches(digits[1::2]), feature=net, **KID)
    assert abs(same["fid"]) < 1e-4 and abs(same["kid_mean"]) < 1e-3
    assert far["fid"] > 100 * halves["fid"] > 0
    assert far["kid_mean"] > 10 * abs(halves["kid_mean"])
    assert same["num_real"] == same["num_fake"] == len(digits)


def test_float_images_in_minus_one_one_are_the_same_as_uint8(digits):
    net = TinyFeatures()
    as_float = [b.float() / 127.5 - 1 for b in batches(digits[:300])]
    a = fid.compute_fid(batches(digits[:300]), batches(digits[300:600]), feature=net, **KID)
    b = fid.compute_fid(as_float, batches(digits[300:600]), feature=net, **KID)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-9, abs=1e-12)
    gray = [torch.from_numpy(digits[:300, :1].copy())]  # one channel is repeated to three
    c = fid.compute_fid(gray, batches(digits[300:600]), feature=net, **KID)
    assert c["fid"] == pytest.approx(a["fid"], rel=1e-9, abs=1e-12)


def test_evaluator_caches_the_real_features_beside_the_shards(tmp_path):
    make_lsun(tmp_path / "db", 30, seed=2, short_side=32)
    prepare(f"lsun:{tmp_path / 'db'}", tmp_path / "shards", 16, workers=1, progress=False)
    net = TinyFeatures()
    ev = fid.FidEvaluator(f"shards:{tmp_path / 'shards'}", 16, num_images=25, feature=net, batch_size=10, **KID)
    cached = list((tmp_path / "shards" / "fid-cache").glob("real-TinyFeatures-25-*.npy"))
    assert len(cached) == 1 and net.calls == 3
    torch.testing.assert_close(torch.from_numpy(np.load(cached[0])), ev.real)
    again = fid.FidEvaluator(f"shards:{tmp_path / 'shards'}", 16, num_images=25, feature=net, batch_size=10, **KID)
    assert net.calls == 3  # read from the cache
    torch.testing.assert_close(again.real, ev.real, rtol=0, atol=0)

    noise = ev(lambda n: torch.rand(n, 3, 16, 16) * 2 - 1)
    assert noise["num_fake"] == 25 and noise["fid"] > 0
    from ehm_fast.data import Shards

    real = Shards(tmp_path / "shards")
    order = iter(np.random.default_rng(0).permutation(30)[:25])  # the evaluator's fixed real subset

    def replay(n):  # the same real images the evaluator took, as a "generator" would give them
        return torch.stack([torch.from_numpy(real[int(next(order))].copy()) for _ in range(n)]).float() / 127.5 - 1

    assert abs(ev(replay)["fid"]) < 1e-4


def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv("EHM_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=f"{fid.INCEPTION_FILE}.*--fid-weights") as missing:
        fid.inception(2048)
    assert str(missing.value).count(str(fid.default_weights_path())) == 1  # the default place, named once
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "given.pth")) as given:
        fid.inception(2048, tmp_path / "given.pth")
    assert str(fid.default_weights_path()) in str(given.value)  # and where else the file may go
    with pytest.raises(ValueError, match="one of"):
        fid.inception(100)
    with pytest.raises(ValueError, match="at least 2"):
        fid.distances(torch.zeros(1, 4), torch.zeros(5, 4))


class _PlainModels:
    """What ehm_fast.runs.load_models returns, for an 8x8 RGB decoder from z [n, 4]."""

    def __init__(self) -> None:
        self.decoder = nn.Sequential(nn.Linear(4, 3 * 8 * 8), nn.Tanh(), nn.Unflatten(1, (3, 8, 8)))

    def sample_prior(self, n, device):
        return torch.randn(n, 4, device=device)


def test_cli_reports_errors_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("EHM_FID_WEIGHTS", raising=False)
    monkeypatch.setattr("ehm_fast.runs.load_models", lambda path, device: (_PlainModels(), None))
    assert fid.main(["--checkpoint", "c.pt", "--data", "digits", "--num-images", "20", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ehm-fid: error: Inception weights not found") and err.count("\n") == 1
    monkeypatch.undo()
    assert fid.main(["--checkpoint", str(tmp_path / "last.pt"), "--data", "digits", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ehm-fid: error: no checkpoint at") and "checkpoint.pt" in err and err.count("\n") == 1


def test_cli_samples_the_run_folder_of_ehm_train(tmp_path, capsys):
    """`ehm-fid --checkpoint RUN_DIR` (README's command) on a real run, with a stand-in extractor."""
    from ehm_fast import train

    out = tmp_path / "run"
    assert train.main(["--width", "4", "--critic-width", "4", "--z-dim", "4", "--batch-size", "8", "--n-critic", "1",
                       "--steps", "1", "--n-samples", "4", "--device", "cpu", "--out", str(out)]) == 0
    sample = fid._load_sampler(str(out), torch.device("cpu"))
    images = sample(50)
    assert images.shape == (50, 1, 32, 32) and images.abs().max() <= 1
    real = fid.real_features("digits", 32, 50, TinyFeatures(), "tiny")
    assert real.shape == (50, 16)
    result = fid.distances(real, fid.extract_features(TinyFeatures(), [images], "cpu"), **KID)
    assert result["num_fake"] == 50 and result["fid"] > 0
