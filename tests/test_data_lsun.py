"""The LSUN reader (and the folder/zip readers) on LSUN-format LMDBs built here."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ehm_fast.data import LSUN, ImageFolder, ZipImages
from ehm_fast.data.synthetic import make_lsun, photo_like

SIZE = 24


@pytest.fixture(scope="module")
def lsun_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("lsun") / "bedroom_train_lmdb"
    items = make_lsun(path, 10, seed=1, corrupt=2, short_side=96)
    return path, items


def pillow_reference(data: bytes, size: int) -> np.ndarray:
    """What Pillow gives for the centered square resized to size x size (Lanczos, reducing_gap 2)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=2.0)).transpose(2, 0, 1)


def test_reader_matches_pillow_for_webp_and_jpeg(lsun_db):
    path, items = lsun_db
    ds = LSUN(path, SIZE)
    assert len(ds) == len(items)
    formats = []
    for i, key in enumerate(sorted(items)):  # LMDB lists keys in sorted order
        img = ds.try_load(i)
        try:
            expected = pillow_reference(items[key], SIZE)
        except (OSError, ValueError):
            assert img is None
            continue
        formats.append(Image.open(io.BytesIO(items[key])).format)
        assert img.dtype == np.uint8 and img.shape == (3, SIZE, SIZE)
        np.testing.assert_array_equal(img, expected)
        t = ds[i]
        assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8
        np.testing.assert_array_equal(t.numpy(), expected)
    assert sorted(formats) == ["JPEG"] * 5 + ["WEBP"] * 5 and ds.skipped == 2


def test_reader_takes_the_centered_square():
    rng = np.random.default_rng(5)
    img = photo_like(rng, 150, 90)
    arr = np.asarray(img).copy()
    arr[:, :30] = 0  # the left and right 30 columns fall outside the centered 90x90 square
    arr[:, 120:] = 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    from ehm_fast.data import decode_square

    out = decode_square(buf.getvalue(), 90)  # no resize at this size: the crop itself
    np.testing.assert_array_equal(out, arr[:, 30:120].transpose(2, 0, 1))


def test_corrupt_entries_are_skipped_and_counted(lsun_db):
    path, _ = lsun_db
    ds = LSUN(path, SIZE)
    bad = [i for i in range(len(ds)) if ds.try_load(i) is None]
    assert len(bad) == 2 and ds.skipped == 2
    # indexing a corrupt entry gives the next decodable one instead of failing
    i = bad[0]
    nxt = next(j % len(ds) for j in range(i + 1, i + len(ds)) if j % len(ds) not in bad)
    np.testing.assert_array_equal(ds[i].numpy(), ds[nxt].numpy())
    assert ds.skipped == 3


def test_environment_is_opened_lazily_per_process(lsun_db):
    from ehm_fast.data import lsun

    path, _ = lsun_db
    ds = LSUN(path, SIZE)
    ds[0]  # the parent has the environment open when the workers fork
    assert lsun._ENVS_PID == os.getpid() and str(path.resolve()) in lsun._ENVS
    clone = pickle.loads(pickle.dumps(ds))  # the dataset holds no handle (environments do not pickle)
    assert clone.source.dbs == ds.source.dbs
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="fork")
    from_workers = torch.cat(list(loader))
    in_process = torch.stack([LSUN(path, SIZE)[i] for i in range(len(ds))])  # a second reader of the same path
    torch.testing.assert_close(from_workers, in_process, rtol=0, atol=0)


def test_folder_of_lmdbs(tmp_path):
    a = make_lsun(tmp_path / "a_lmdb", 3, seed=2, short_side=40)
    b = make_lsun(tmp_path / "b_lmdb", 2, seed=3, short_side=40)
    ds = LSUN(tmp_path, 16)
    assert len(ds) == 5 and len(ds.source.dbs) == 2
    expected = [pillow_reference(a[k], 16) for k in sorted(a)] + [pillow_reference(b[k], 16) for k in sorted(b)]
    for i, e in enumerate(expected):
        np.testing.assert_array_equal(ds[i].numpy(), e)
    assert ds.source.name(4).startswith("b_lmdb/") and len(ds.source.name(4).split("/")[1]) == 40


def test_folder_and_zip_readers_match_lsun(lsun_db, tmp_path):
    path, items = lsun_db
    ds = LSUN(path, SIZE)
    good = {k: items[k] for i, k in enumerate(sorted(items)) if ds.try_load(i) is not None}
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    archive = zipfile.ZipFile(tmp_path / "imgs.zip", "w")
    for k, v in good.items():
        # a misleading extension: decoding goes by content
        name = f"sub/{k.decode()}.jpg" if v[:4] == b"RIFF" else f"{k.decode()}.JPG"
        (folder / name).write_bytes(v)
        archive.writestr(name, v)
    (folder / "notes.txt").write_text("not an image")
    archive.close()
    for ds in (ImageFolder(folder, SIZE), ZipImages(tmp_path / "imgs.zip", SIZE)):
        assert len(ds) == len(good)
        for i in range(len(ds)):
            key = os.path.basename(ds.source.name(i)).split(".")[0].encode()
            np.testing.assert_array_equal(ds[i].numpy(), pillow_reference(good[key], SIZE))


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LSUN(tmp_path / "missing", SIZE)
    with pytest.raises(ValueError, match="no LMDB"):
        LSUN(tmp_path, SIZE)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not an LMDB"):
        LSUN(tmp_path / "file.txt", SIZE)
    with pytest.raises(ValueError, match="no image files"):
        ImageFolder(tmp_path, SIZE)
    with pytest.raises(FileNotFoundError):
        ZipImages(tmp_path / "none.zip", SIZE)
    with pytest.raises(ValueError, match="not a readable zip"):
        ZipImages(tmp_path / "file.txt", SIZE)
