"""Packed uint8 image shards: `shard-NNNNN.npy` ([n, C, S, S], memory-mappable) + `index.json`.

A shard is written to a temporary name, hashed, described by its own `shard-NNNNN.json`, and only
then renamed into place, so a file with the final name is always complete; `index.json` is
written last and lists every shard with its count and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "ehm-shards"
VERSION = 1
INDEX = "index.json"


def shard_stem(j: int) -> str:
    return f"shard-{j:05d}"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_shard(out_dir: Path, j: int, images: np.ndarray, meta: dict) -> dict:
    """Writes shard j atomically and returns its record (file, count, sha256 and `meta`)."""
    stem = shard_stem(j)
    final = out_dir / f"{stem}.npy"
    tmp = out_dir / f"{stem}.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(images, dtype=np.uint8))
        f.flush()
        os.fsync(f.fileno())
    record = {"file": final.name, "count": int(images.shape[0]), "sha256": sha256_file(tmp), **meta}
    _write_json_atomic(out_dir / f"{stem}.json", record)
    os.replace(tmp, final)
    return record


def finished_shard(out_dir: Path, j: int) -> dict | None:
    """Shard j's record if its .npy exists and matches the recorded checksum, else None."""
    stem = shard_stem(j)
    npy, rec = out_dir / f"{stem}.npy", out_dir / f"{stem}.json"
    if not (npy.is_file() and rec.is_file()):
        return None
    try:
        record = json.loads(rec.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    if record.get("file") != npy.name or sha256_file(npy) != record.get("sha256"):
        return None
    return record


def write_index(out_dir: Path, header: dict, records: list[dict]) -> dict:
    index = {
        "format": FORMAT,
        "version": VERSION,
        **header,
        "num_images": sum(r["count"] for r in records),
        "skipped": sum(r.get("skipped", 0) for r in records),
        "shards": records,
    }
    _write_json_atomic(out_dir / INDEX, index)
    return index


def read_index(path: str | os.PathLike) -> dict:
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"shard folder not found: {root}")
    index_path = root / INDEX
    if not index_path.is_file():
        hint = " (preparation did not finish: rerun ehm-prepare with the same arguments)" if any(root.glob("shard-*")) else ""
        raise FileNotFoundError(f"no {INDEX} in {root}{hint}")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{index_path} is not valid JSON: {err}") from err
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{index_path} is not an {FORMAT} v{VERSION} index")
    return index


class Shards:
    """The prepared images of a shard folder as one memory-mapped uint8 [N, C, S, S] collection."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.index = read_index(self.path)
        self.image_size = int(self.index["image_size"])
        self.channels = int(self.index["channels"])
        self.counts = np.array([r["count"] for r in self.index["shards"]], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self._arrays: list[np.ndarray] | None = None
        if len(self) == 0:
            raise ValueError(f"{self.path} holds no images")

    @property
    def arrays(self) -> list[np.ndarray]:
        if self._arrays is None:  # memory maps are opened on first use (cheap to pickle before)
            arrays = []
            for r in self.index["shards"]:
                file = self.path / r["file"]
                if not file.is_file():
                    raise FileNotFoundError(f"shard {file} listed in {self.path / INDEX} is missing")
                a = np.load(file, mmap_mode="r")
                if a.shape != (r["count"], self.channels, self.image_size, self.image_size) or a.dtype != np.uint8:
                    raise ValueError(f"shard {file} has shape {a.shape} {a.dtype}, the index says {r['count']} images")
                arrays.append(a)
            self._arrays = arrays
        return self._arrays

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"Shards({str(self.path)!r}, n={len(self)}, size={self.image_size})"

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        j = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return np.asarray(self.arrays[j][i - self.offsets[j]])

    def gather(self, indices: np.ndarray, out: np.ndarray) -> None:
        """Copies images `indices` (sorted ascending) into out[:len(indices)], one fancy-index
        read per shard (numpy releases the GIL, so several threads gather at once)."""
        arrays = self.arrays
        bounds = np.searchsorted(indices, self.offsets)
        for j in np.flatnonzero(np.diff(bounds)):
            a, b = bounds[j], bounds[j + 1]
            np.take(arrays[j], indices[a:b] - self.offsets[j], axis=0, out=out[a:b])

    def verify(self) -> list[str]:
        """Names of the shards whose checksum differs from the index (empty when all are intact)."""
        return [r["file"] for r in self.index["shards"] if sha256_file(self.path / r["file"]) != r["sha256"]]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None}
