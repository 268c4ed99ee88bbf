"""LSUN databases: one LMDB per category, keys are 40-hex image ids, values encoded images.

Unlike torchvision's LSUN class, the keys are listed by a cursor walk into a numpy array (no
pickle cache in the working directory), and each process opens its own read-only environment on
first use, so worker processes never use an environment opened before they forked.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .images import DecodedImages


def find_lmdbs(path: str | os.PathLike) -> list[Path]:
    """`path` itself when it is an LMDB (holds data.mdb), else the LMDBs directly inside it."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"LSUN path not found: {root}")
    if (root / "data.mdb").is_file():
        return [root]
    if not root.is_dir():
        raise ValueError(f"{root} is not an LMDB directory (no data.mdb) nor a folder of them")
    found = sorted(p for p in root.iterdir() if (p / "data.mdb").is_file())
    if not found:
        raise ValueError(f"no LMDB (a directory with data.mdb) in {root}")
    return found


_ENVS: dict[str, object] = {}  # this process's read-only environments, by resolved path
_ENVS_PID: int | None = None
_ENVS_LOCK = threading.Lock()


def environment(path: Path):
    """This process's read-only environment of `path` (resolved), opened on first use. lmdb allows one
    open per path and process, so every reader of a path shares it; a forked child closes the
    copies it inherited (read-only, lock=False: nothing shared changes) and opens its own."""
    global _ENVS_PID
    import lmdb

    with _ENVS_LOCK:
        if _ENVS_PID != os.getpid():
            for env in _ENVS.values():
                env.close()
            _ENVS.clear()
            _ENVS_PID = os.getpid()
        key = str(path)
        if key not in _ENVS:
            try:
                _ENVS[key] = lmdb.open(key, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512)
            except lmdb.Error as err:
                raise ValueError(f"cannot open LMDB {path}: {err}") from err
        return _ENVS[key]


def list_keys(path: Path) -> np.ndarray:
    """Every key of one LMDB, in key order (a cursor walk), as a fixed-width bytes array."""
    with environment(path).begin(buffers=False) as txn:
        keys = list(txn.cursor().iternext(keys=True, values=False))
    width = max((len(k) for k in keys), default=1)
    return np.array(keys, dtype=f"S{width}")


class LMDBSource:
    """The values of one or more LMDBs as one indexable byte source."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.dbs = [db.resolve() for db in find_lmdbs(path)]
        self.keys = [list_keys(db) for db in self.dbs]
        self.offsets = np.cumsum([0] + [len(k) for k in self.keys])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"LMDBSource({str(self.path)!r}, dbs={len(self.dbs)}, n={len(self)})"

    def _locate(self, i: int) -> tuple[int, bytes]:
        db = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return db, bytes(self.keys[db][i - self.offsets[db]])

    def read(self, i: int) -> bytes:
        db, key = self._locate(i)
        with environment(self.dbs[db]).begin() as txn:
            value = txn.get(key)
        if value is None:
            raise ValueError(f"key {key.decode(errors='replace')} vanished from {self.dbs[db]}")
        return value

    def name(self, i: int) -> str:
        db, key = self._locate(i)
        return f"{self.dbs[db].name}/{key.decode(errors='replace')}"


class LSUN(DecodedImages):
    """Map-style dataset over one or more LSUN LMDBs (or a folder of them): uint8 [3, S, S]."""

    def __init__(self, path: str | os.PathLike, image_size: int = 64) -> None:
        super().__init__(LMDBSource(path), image_size)
