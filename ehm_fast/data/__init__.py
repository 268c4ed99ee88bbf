"""Data for ehm_fast: LSUN/folder/zip readers, packed shards, the training loader, digits.

The trainer's entry point is `open_data(spec, image_size, seed=..., rank=..., world_size=...)`.
"""

from .digits import Digits
from .folder import ImageFolder, ZipImages
from .images import DecodedImages, decode_square
from .loader import BatchLoader, open_data, random_subset
from .lsun import LSUN
from .prepare import prepare
from .shards import Shards
from .spec import open_images, parse_spec

__all__ = [
    "LSUN",
    "BatchLoader",
    "DecodedImages",
    "Digits",
    "ImageFolder",
    "Shards",
    "ZipImages",
    "decode_square",
    "open_data",
    "open_images",
    "parse_spec",
    "prepare",
    "random_subset",
]
