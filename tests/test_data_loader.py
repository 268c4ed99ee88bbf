"""The training loader: batches, flips, disjoint ranks, determinism, exact resume, errors."""

import itertools

import numpy as np
import pytest
import torch

from ehm_fast.data import BatchLoader, Digits, Shards, open_data, prepare
from ehm_fast.data.synthetic import make_lsun

SIZE = 12


class Numbered:
    """n distinct images: image i is filled with a pattern that encodes i and is not mirror-symmetric."""

    def __init__(self, n: int, size: int = 6) -> None:
        self.image_size, self.channels = size, 3
        base = np.arange(size, dtype=np.int64)[None, None, :] * 7  # varies along the width
        self.images = ((np.arange(n)[:, None, None, None] * 3 + base[None]) % 251).astype(np.uint8)
        self.images = np.broadcast_to(self.images, (n, 3, size, size)).copy()

    def __len__(self) -> int:
        return len(self.images)

    def gather(self, indices, out):
        out[: len(indices)] = self.images[indices]


def identify(batch: torch.Tensor, images: Numbered) -> list[tuple[int, bool]]:
    """(image id, flipped) of every image of a [-1, 1] batch."""
    u8 = ((batch.float() + 1) * 127.5).round().to(torch.uint8).numpy()
    found = []
    for img in u8:
        for i, ref in enumerate(images.images):
            if np.array_equal(img, ref):
                found.append((i, False))
                break
            if np.array_equal(img, ref[..., ::-1]):
                found.append((i, True))
                break
        else:
            raise AssertionError("batch holds an image that is not in the set")
    return found


def test_batches_are_the_images_scaled_and_flipped():
    images = Numbered(40)
    with BatchLoader(images, 8, seed=3, workers=2) as loader:
        batches = [next(loader) for _ in range(10)]
    flips = 0
    for b in batches:
        assert b.shape == (8, 3, 6, 6) and b.dtype == torch.float32
        assert b.min() >= -1 and b.max() <= 1
        ids = identify(b, images)
        assert len({i for i, _ in ids}) == 8
        flips += sum(f for _, f in ids)
    assert 20 <= flips <= 60  # about half of 80 are mirrored
    exact = BatchLoader(images, 8, seed=3, flip=False, workers=1)
    b = next(exact)
    idx, _ = exact.batch_indices(0, 0)
    torch.testing.assert_close(b, torch.from_numpy(images.images[idx]).float() / 127.5 - 1, rtol=0, atol=1e-6)
    exact.close()


def test_every_epoch_is_a_permutation_split_disjointly_over_ranks():
    images = Numbered(43)
    ranks = [BatchLoader(images, 5, seed=11, rank=r, world_size=2, workers=1) for r in range(2)]
    assert ranks[0].batches_per_epoch == 4  # global batches of 10: the last 3 images dropped
    for epoch in range(3):
        seen = []
        for loader in ranks:
            mine = [i for _ in range(4) for i, _ in identify(next(loader), images)]
            assert len(set(mine)) == 20
            seen.append(set(mine))
        assert not seen[0] & seen[1]
        assert all(loader.epoch == epoch + 1 and loader.batch == 0 for loader in ranks)
    # the epochs differ in order
    assert not np.array_equal(ranks[0].batch_indices(0, 0)[0], ranks[0].batch_indices(1, 0)[0])
    for loader in ranks:
        loader.close()


def test_ranks_together_read_what_one_process_reads():
    """Rank r's batch is the r-th slice of the global batch, flips included: 2 ranks of batch B
    give exactly one process of batch 2B (the trainer's distributed-equivalence relies on it),
    and a position saved by one resumes the other."""
    images = Numbered(43)
    one = BatchLoader(images, 10, seed=4, workers=1)
    ranks = [BatchLoader(images, 5, seed=4, rank=r, world_size=2, workers=1) for r in range(2)]
    for _ in range(6):  # crosses an epoch end (4 global batches per epoch)
        torch.testing.assert_close(torch.cat([next(r) for r in ranks]), next(one), rtol=0, atol=0)
    state = ranks[1].state_dict()
    resumed = BatchLoader(images, 10, seed=0, workers=1)
    resumed.load_state_dict(state)
    torch.testing.assert_close(next(resumed), next(one), rtol=0, atol=0)
    for loader in (one, resumed, *ranks):
        loader.close()


def test_same_seed_same_stream_and_exact_resume():
    images = Numbered(30)
    a = BatchLoader(images, 4, seed=5, workers=2, prefetch=3)
    stream = [next(a) for _ in range(17)]  # 7 batches per epoch: crosses two epoch ends
    b = BatchLoader(images, 4, seed=5, workers=1)
    for x, y in zip(stream, (next(b) for _ in range(17))):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    other = BatchLoader(images, 4, seed=6, workers=1)
    assert any(not torch.equal(x, next(other)) for x in stream[:3])

    c = BatchLoader(images, 4, seed=5, workers=2)
    for _ in range(9):
        next(c)
    state = c.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    d = BatchLoader(images, 4, seed=999, workers=2)
    next(d)  # a loader already running is repositioned too
    d.load_state_dict(state)
    for x in stream[9:]:
        torch.testing.assert_close(next(d), x, rtol=0, atol=0)
    for loader in (a, b, c, d, other):
        loader.close()


def test_bad_loader_state_is_refused():
    loader = BatchLoader(Numbered(30), 4, seed=5, workers=1)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="global batch of 4 .* this loader has 8"):
        BatchLoader(Numbered(30), 8, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="num_images=30, this loader has 31"):
        BatchLoader(Numbered(31), 4, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        loader.load_state_dict({**state, "batch": 99})
    loader.close()


def test_digits_through_open_data():
    loader = open_data("digits", 32, seed=0, batch_size=16, workers=1)
    x = next(loader)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() > 0.9
    torch.testing.assert_close(x[:, 0], x[:, 2], rtol=0, atol=0)  # gray repeated
    one = open_data("digits", 8, seed=0, batch_size=4, channels=1, dtype=torch.bfloat16)
    y = next(one)
    assert y.shape == (4, 1, 8, 8) and y.dtype == torch.bfloat16
    # at 8x8 the digits are sklearn's own pixels scaled to [0, 255]
    from sklearn.datasets import load_digits

    expected = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    np.testing.assert_array_equal(Digits(8, 1).images[:, 0], expected)
    loader.close()
    one.close()


def test_shards_and_lsun_specs(tmp_path):
    make_lsun(tmp_path / "db", 20, seed=4, short_side=32)
    prepare(f"lsun:{tmp_path / 'db'}", tmp_path / "shards", SIZE, workers=1, shard_size=6, progress=False)
    shards = Shards(tmp_path / "shards")
    out = np.empty((5, 3, SIZE, SIZE), dtype=np.uint8)
    idx = np.array([0, 5, 6, 7, 19])  # crosses shard boundaries
    shards.gather(idx, out)
    np.testing.assert_array_equal(out, np.stack([shards[i] for i in idx]))

    from_shards = open_data(f"shards:{tmp_path / 'shards'}", SIZE, seed=1, batch_size=4, workers=2)
    with pytest.warns(UserWarning, match="ehm-prepare"):
        from_lmdb = open_data(f"lsun:{tmp_path / 'db'}", SIZE, seed=1, batch_size=4, workers=2)
    for x, y in itertools.islice(zip(from_shards, from_lmdb), 8):  # same images, same order
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    from_shards.close()
    from_lmdb.close()


def test_open_data_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data spec"):
        open_data("imagenet:/x", 64, seed=0)
    with pytest.raises(ValueError, match="needs a path"):
        open_data("shards:", 64, seed=0)
    with pytest.raises(FileNotFoundError, match="shard folder not found"):
        open_data(f"shards:{tmp_path / 'none'}", 64, seed=0)
    with pytest.raises(FileNotFoundError, match="no index.json"):
        open_data(f"shards:{tmp_path}", 64, seed=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        open_data(f"folder:{tmp_path / 'none'}", 64, seed=0)
    with pytest.raises(ValueError, match="fewer than one batch of 1000 per process"):
        open_data("digits", 8, seed=0, batch_size=1000, world_size=2)
    with pytest.raises(ValueError, match="only available for digits"):
        open_data(f"shards:{tmp_path}", 64, seed=0, channels=1)
    with pytest.raises(ValueError, match="rank"):
        open_data("digits", 8, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        open_data("digits", 8, seed=-1)
    make_lsun(tmp_path / "db", 3, short_side=20)
    prepare(f"lsun:{tmp_path / 'db'}", tmp_path / "s8", 8, workers=1, progress=False)
    with pytest.raises(ValueError, match="--size 16"):
        open_data(f"shards:{tmp_path / 's8'}", 16, seed=0)
