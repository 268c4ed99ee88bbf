"""Data specs as the command lines take them: `digits`, `lsun:PATH`, `folder:PATH`, `zip:PATH`,
`shards:DIR`."""

from __future__ import annotations

from .images import DecodedImages

IMAGE_KINDS = ("lsun", "folder", "zip")
KINDS = ("digits", "shards") + IMAGE_KINDS


def parse_spec(spec: str) -> tuple[str, str]:
    """'kind:path' -> (kind, path); 'digits' -> ('digits', '')."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"data spec must be a non-empty string, got {spec!r}")
    kind, sep, path = spec.partition(":")
    if kind == "digits" and not path:
        return kind, ""
    if kind not in KINDS or kind == "digits":
        raise ValueError(f"unknown data spec {spec!r}: use digits, " + ", ".join(f"{k}:PATH" for k in KINDS[1:]))
    if not path:
        raise ValueError(f"data spec {spec!r} needs a path after '{kind}:'")
    return kind, path


def open_images(spec: str, image_size: int) -> DecodedImages:
    """The decoding dataset of an encoded-image spec (lsun:, folder:, zip:)."""
    kind, path = parse_spec(spec)
    if kind == "lsun":
        from .lsun import LSUN

        return LSUN(path, image_size)
    if kind == "folder":
        from .folder import ImageFolder

        return ImageFolder(path, image_size)
    if kind == "zip":
        from .folder import ZipImages

        return ZipImages(path, image_size)
    raise ValueError(f"{spec!r} is not an encoded-image source: use " + ", ".join(f"{k}:PATH" for k in IMAGE_KINDS))
