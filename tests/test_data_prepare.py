"""ehm-prepare: shards equal to the reader's pixels, atomic shards, resuming after a crash or a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ehm_fast.data import LSUN, Shards, prepare
from ehm_fast.data import shards as fmt
from ehm_fast.data.prepare import main
from ehm_fast.data.synthetic import make_lsun

SIZE = 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lsun_db(tmp_path_factory):
    path = tmp_path_factory.mktemp("lsun") / "db"
    make_lsun(path, 22, seed=7, corrupt=2, short_side=48)
    return path


@pytest.fixture(scope="module")
def clean_run(lsun_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    return prepare(f"lsun:{lsun_db}", out, SIZE, workers=2, shard_size=5, chunk_size=2, progress=False), out


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.npy"))}


def test_shards_hold_the_readers_pixels(lsun_db, clean_run):
    index, out = clean_run
    ds = LSUN(lsun_db, SIZE)
    expected = [img for img in (ds.try_load(i) for i in range(len(ds))) if img is not None]
    assert index["num_images"] == len(expected) == 22 and index["skipped"] == 2
    assert index["source"] == f"lsun:{lsun_db.resolve()}" and index["image_size"] == SIZE
    assert [r["count"] for r in index["shards"]] == [min(5, 24 - 5 * j) - r["skipped"] for j, r in enumerate(index["shards"])]
    assert index["report"]["written"] == 22 and index["report"]["shards_written"] == 5
    assert len(index["report"]["skipped_names"]) == 2
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["shards"] == index["shards"]
    shards = Shards(out)
    assert len(shards) == 22 and shards.verify() == []
    np.testing.assert_array_equal(np.concatenate([np.load(out / r["file"]) for r in index["shards"]]), np.stack(expected))
    for i in (0, 4, 5, 21):
        np.testing.assert_array_equal(shards[i], expected[i])
    assert not list(out.glob("*.tmp"))


def test_one_worker_writes_the_same_shards(lsun_db, clean_run, tmp_path):
    index = prepare(f"lsun:{lsun_db}", tmp_path, SIZE, workers=1, shard_size=5, chunk_size=3, progress=False)
    assert shard_bytes(tmp_path) == shard_bytes(clean_run[1])
    assert [r["sha256"] for r in index["shards"]] == [r["sha256"] for r in clean_run[0]["shards"]]


def test_rerun_after_a_crash_gives_identical_shards(lsun_db, clean_run, tmp_path, monkeypatch):
    real_write = fmt.write_shard

    def crash_after_first(out_dir, j, images, meta):
        if j == 0:
            return real_write(out_dir, j, images, meta)
        (out_dir / f"{fmt.shard_stem(j)}.npy.tmp").write_bytes(b"\x93NUMPY half a shard")
        raise RuntimeError("injected crash while writing shard 1")

    monkeypatch.setattr(fmt, "write_shard", crash_after_first)
    with pytest.raises(RuntimeError, match="injected"):
        prepare(f"lsun:{lsun_db}", tmp_path, SIZE, workers=2, shard_size=5, chunk_size=2, progress=False)
    assert (tmp_path / "shard-00000.npy").is_file() and not (tmp_path / "shard-00001.npy").exists()
    assert not (tmp_path / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        Shards(tmp_path)
    first = (tmp_path / "shard-00000.npy").stat().st_mtime_ns
    monkeypatch.setattr(fmt, "write_shard", real_write)
    index = prepare(f"lsun:{lsun_db}", tmp_path, SIZE, workers=2, shard_size=5, chunk_size=2, progress=False)
    assert index["report"]["shards_resumed"] == 1 and index["report"]["shards_written"] == 4
    assert (tmp_path / "shard-00000.npy").stat().st_mtime_ns == first
    assert shard_bytes(tmp_path) == shard_bytes(clean_run[1])
    assert index["shards"] == clean_run[0]["shards"] and not list(tmp_path.glob("*.tmp"))



_CRASH_LOOP = """
import sys
from ehm_fast.data import prepare
from ehm_fast.data import shards as fmt

real_write = fmt.write_shard

def crash_after_first(out_dir, j, images, meta):
    if j == 0:
        return real_write(out_dir, j, images, meta)
    raise RuntimeError("injected")

fmt.write_shard = crash_after_first
source, out, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
for k in range(runs):
    try:
        prepare(source, f"{out}/{k}", 16, workers=2, shard_size=5, chunk_size=2, progress=False)
    except RuntimeError:
        pass
print("every run returned")
"""


def test_an_error_while_workers_run_never_hangs(lsun_db, tmp_path):
    """An error in the writer while workers still decode: the workers stop and prepare raises.
    multiprocessing.Pool.terminate hung here once in a few hundred runs (its task feeder blocked on
    the queue's lock), which stalled CI; in a child process, so a hang fails instead of stalling."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", _CRASH_LOOP, f"lsun:{lsun_db}", str(tmp_path), "60"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "every run returned" in r.stdout, r.stderr[-2000:]

def test_a_damaged_shard_is_redone(lsun_db, clean_run, tmp_path):
    prepare(f"lsun:{lsun_db}", tmp_path, SIZE, workers=1, shard_size=5, progress=False)
    damaged = tmp_path / "shard-00002.npy"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert Shards(tmp_path).verify() == ["shard-00002.npy"]
    index = prepare(f"lsun:{lsun_db}", tmp_path, SIZE, workers=1, shard_size=5, progress=False)
    assert index["report"]["shards_written"] == 1 and shard_bytes(tmp_path) == shard_bytes(clean_run[1])


def test_rerun_after_kill_gives_identical_shards(lsun_db, clean_run, tmp_path):
    cmd = [sys.executable, "-m", "ehm_fast.data.prepare", "--source", f"lsun:{lsun_db}", "--out", str(tmp_path)]
    cmd += ["--size", str(SIZE), "--workers", "1", "--shard-size", "5", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (tmp_path / "shard-00000.npy").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "shard-00000.npy").exists()
    index = prepare(f"lsun:{lsun_db}", tmp_path, SIZE, workers=2, shard_size=5, progress=False)
    assert index["report"]["shards_resumed"] >= 1
    assert shard_bytes(tmp_path) == shard_bytes(clean_run[1]) and not list(tmp_path.glob("*.tmp"))


def test_other_settings_in_the_same_folder_are_refused(lsun_db, clean_run):
    with pytest.raises(ValueError, match="other settings.*image_size"):
        prepare(f"lsun:{lsun_db}", clean_run[1], SIZE + 1, shard_size=5, progress=False)


def test_cli(lsun_db, tmp_path, capsys):
    assert main(["--source", f"lsun:{lsun_db}", "--out", str(tmp_path / "o"), "--size", "8", "--workers", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "22 images in 1 shards" in out and "skipped 2 undecodable" in out and out.count("  skipped: ") == 2
    assert Shards(tmp_path / "o").image_size == 8
    assert main(["--source", f"lsun:{tmp_path / 'nothing'}", "--out", str(tmp_path / "p")]) == 2
    assert "ehm-prepare: error: LSUN path not found" in capsys.readouterr().err
    assert main(["--source", "shards:/x", "--out", str(tmp_path / "p")]) == 2
    assert "--source must be one of" in capsys.readouterr().err
    assert main(["--source", "webdataset:/x", "--out", str(tmp_path / "p")]) == 2
    assert "unknown data spec" in capsys.readouterr().err


def test_zip_and_folder_sources(tmp_path):
    import zipfile

    from ehm_fast.data.synthetic import encode, photo_like

    rng = np.random.default_rng(3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as zf:
        for i in range(7):
            data = encode(photo_like(rng, 40 + 3 * i, 30), "WEBP" if i % 2 else "PNG")
            (folder / f"{i:02d}.png").write_bytes(data)
            zf.writestr(f"{i:02d}.png", data)
    a = prepare(f"zip:{tmp_path / 'imgs.zip'}", tmp_path / "za", SIZE, workers=2, shard_size=3, progress=False)
    b = prepare(f"folder:{folder}", tmp_path / "fb", SIZE, workers=1, shard_size=3, progress=False)
    assert a["num_images"] == b["num_images"] == 7 and a["skipped"] == 0
    assert shard_bytes(tmp_path / "za") == shard_bytes(tmp_path / "fb")
    from ehm_fast.data import ZipImages

    ds = ZipImages(tmp_path / "imgs.zip", SIZE)
    np.testing.assert_array_equal(np.stack([Shards(tmp_path / "za")[i] for i in range(7)]), np.stack([ds[i].numpy() for i in range(7)]))
