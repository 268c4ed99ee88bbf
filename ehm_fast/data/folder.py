"""Images in a folder tree or a zip archive, listed by file extension and decoded by content."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from .images import DecodedImages

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"})


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not Path(name).name.startswith(".")


class FolderSource:
    """Every image file under a folder (recursively), in sorted path order."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"image folder not found: {self.path}")
        if not self.path.is_dir():
            raise ValueError(f"{self.path} is not a folder")
        self.files = sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file() and _is_image_name(p.name))
        if not self.files:
            raise ValueError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {self.path}")

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"FolderSource({str(self.path)!r}, n={len(self)})"

    def read(self, i: int) -> bytes:
        return (self.path / self.files[i]).read_bytes()

    def name(self, i: int) -> str:
        return self.files[i]


class ZipSource:
    """Every image member of a zip archive; each process opens its own handle on first use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"zip archive not found: {self.path}")
        try:
            with zipfile.ZipFile(self.path) as zf:
                self.members = sorted(n for n in zf.namelist() if not n.endswith("/") and _is_image_name(n))
        except zipfile.BadZipFile as err:
            raise ValueError(f"{self.path} is not a readable zip archive: {err}") from err
        if not self.members:
            raise ValueError(f"no image files in {self.path}")
        self._pid: int | None = None
        self._zip: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return f"ZipSource({str(self.path)!r}, n={len(self)})"

    def read(self, i: int) -> bytes:
        if self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        # one handle per process; threads share it (ZipFile serialises its seeks and reads)
        return self._zip.read(self.members[i])

    def name(self, i: int) -> str:
        return self.members[i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": None, "_zip": None}


class ImageFolder(DecodedImages):
    def __init__(self, path: str | os.PathLike, image_size: int = 64) -> None:
        super().__init__(FolderSource(path), image_size)


class ZipImages(DecodedImages):
    def __init__(self, path: str | os.PathLike, image_size: int = 64) -> None:
        super().__init__(ZipSource(path), image_size)
