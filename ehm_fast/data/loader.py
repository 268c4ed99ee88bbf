"""The training loader: random batches gathered by background threads, finished on the device.

Every epoch is a permutation of all images drawn from (seed, epoch), cut into global batches of
`batch_size` x world_size images (the last partial one is dropped); each global batch is sorted
(reads in storage order) and rank r takes its r-th slice of `batch_size`. Ranks see disjoint
images, and together exactly what one process with the global batch sees, flips included: a
position (epoch, batch) means the same data whatever the number of ranks. Batch k of epoch e
depends on (seed, e, k) only, so the stream is reproducible and `load_state_dict` resumes it at
the exact batch, also with another number of ranks that keeps the global batch.

Threads gather uint8 images into a ring of host buffers (pinned when the device is CUDA; numpy's
copies release the GIL); the main thread copies a buffer to the GPU with non_blocking=True and
there flips images horizontally at random and maps [0, 255] -> [-1, 1] in the compute dtype. On
the CPU the worker threads do those last steps too (torch releases the GIL), off the main thread.
"""

from __future__ import annotations

import collections
import os
import queue
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


class ImageCollection(Protocol):
    image_size: int
    channels: int

    def __len__(self) -> int: ...

    def gather(self, indices: np.ndarray, out: np.ndarray) -> None: ...


class BatchLoader:
    """Infinite iterator of float batches [batch_size, C, S, S] in [-1, 1] on `device`."""

    def __init__(
        self,
        images: ImageCollection,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        flip: bool = True,
        workers: int | None = None,
        prefetch: int = 4,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.images = images
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.flip = flip
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(images) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the data has {len(images)} images, fewer than one batch of {batch_size} per process "
                f"({world_size} process(es)); lower the batch size"
            )
        self.epoch, self.batch = 0, 0  # position of the next batch returned
        self._plan_epoch, self._plan = -1, np.empty(0, dtype=np.int64)
        self._sched = (0, 0)  # position of the next batch scheduled
        self._inflight: collections.deque[Future] = collections.deque()
        self.prefetch = max(1, prefetch)
        self._on_cuda = self.device.type == "cuda"
        pin = self._on_cuda and torch.cuda.is_available()
        shape = (batch_size, images.channels, images.image_size, images.image_size)
        self._free: queue.Queue = queue.Queue()
        for _ in range(self.prefetch + 1):  # one more than can be in flight: a worker never waits forever
            self._free.put((torch.empty(shape, dtype=torch.uint8, pin_memory=pin), None))
        self._pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1), thread_name_prefix="ehm-data")

    @property
    def channels(self) -> int:
        return self.images.channels

    @property
    def image_size(self) -> int:
        return self.images.image_size

    @property
    def num_images(self) -> int:
        return len(self.images)

    # -- the plan -------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._plan_epoch:
            self._plan = np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
            self._plan_epoch = epoch
        return self._plan

    def batch_indices(self, epoch: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices, ascending, and flip mask) of batch `batch` of `epoch` on this rank."""
        g = self.global_batch
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        idx = np.sort(self._epoch_order(epoch)[batch * g : (batch + 1) * g])[mine]
        flips = np.random.default_rng([self.seed, epoch, batch]).random(g)[mine] < 0.5
        return idx, flips & self.flip

    # -- the pipeline ---------------------------------------------------------------------------
    def _fill(self, idx: np.ndarray, flips: np.ndarray):
        """Runs in a worker thread: gathers a batch; on the CPU also finishes it there."""
        buf, copied = self._free.get()
        if copied is not None:
            copied.synchronize()  # the previous device copy out of this buffer has finished
        self.images.gather(idx, buf.numpy())
        return (buf, flips) if self._on_cuda else self._finish(buf, flips)

    def _finish(self, buf: torch.Tensor, flips: np.ndarray) -> torch.Tensor:
        """Host buffer -> device, random horizontal flips, uint8 -> [-1, 1] in the compute dtype."""
        x = buf.to(self.device, non_blocking=True)  # on the CPU this is buf itself
        if self._on_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._free.put((buf, event))
        if flips.any():
            rows = torch.from_numpy(np.flatnonzero(flips)).to(self.device, non_blocking=True)
            x.index_copy_(0, rows, x.index_select(0, rows).flip(3))
        x = x.to(torch.float32).mul_(2.0 / 255.0).sub_(1.0).to(self.dtype)
        if not self._on_cuda:
            self._free.put((buf, None))  # x no longer shares memory with buf
        return x

    def _schedule(self) -> None:
        while len(self._inflight) < self.prefetch:
            e, k = self._sched
            self._inflight.append(self._pool.submit(self._fill, *self.batch_indices(e, k)))
            self._sched = (e + 1, 0) if k + 1 == self.batches_per_epoch else (e, k + 1)

    def _drain(self) -> None:
        while self._inflight:
            try:
                result = self._inflight.popleft().result()
            except Exception:  # noqa: BLE001 - a batch being thrown away; __next__ reports such errors
                continue
            if self._on_cuda:
                self._free.put((result[0], None))

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> torch.Tensor:
        self._schedule()
        result = self._inflight.popleft().result()
        x = self._finish(*result) if self._on_cuda else result
        self.epoch, self.batch = (self.epoch + 1, 0) if self.batch + 1 == self.batches_per_epoch else (self.epoch, self.batch + 1)
        self._schedule()
        return x

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_images": len(self.images),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes at the saved position (the same data and global batch required, on any number
        of ranks; the seed is taken from the state so a resumed run continues the same stream)."""
        if state.get("num_images") != len(self.images):
            raise ValueError(f"loader state has num_images={state.get('num_images')}, this loader has {len(self.images)}")
        saved = state.get("batch_size", 0) * state.get("world_size", 1)
        if saved != self.global_batch:
            raise ValueError(
                f"loader state has a global batch of {saved} (batch_size={state.get('batch_size')} x "
                f"{state.get('world_size')} ranks), this loader has {self.global_batch} "
                f"(batch_size={self.batch_size} x {self.world_size})"
            )
        if not 0 <= state["batch"] < self.batches_per_epoch or state["epoch"] < 0:
            raise ValueError(f"loader state position (epoch {state['epoch']}, batch {state['batch']}) is out of range")
        self._drain()
        self.seed = int(state["seed"])
        self._plan_epoch = -1
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._sched = (self.epoch, self.batch)

    def close(self) -> None:
        self._drain()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"BatchLoader({self.images!r}, batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, "
            f"device={self.device}, dtype={self.dtype}, epoch={self.epoch}, batch={self.batch})"
        )


def open_images_for_training(spec: str, image_size: int, channels: int = 3) -> ImageCollection:
    """The image collection behind a data spec, checked against the requested size."""
    from .spec import open_images, parse_spec

    kind, path = parse_spec(spec)
    if kind == "digits":
        from .digits import Digits

        return Digits(image_size, channels)
    if channels != 3:
        raise ValueError(f"channels={channels} is only available for digits; {kind} images are RGB")
    if kind == "shards":
        from .shards import Shards

        shards = Shards(path)
        if shards.image_size != image_size:
            raise ValueError(
                f"{path} holds {shards.image_size}x{shards.image_size} images, not {image_size}x{image_size}: "
                f"rerun ehm-prepare with --size {image_size}"
            )
        return shards
    images = open_images(spec, image_size)  # a bad path fails here, before the warning
    warnings.warn(
        f"--data {spec} decodes every image with Pillow in the training loop (a few hundred images/s per thread: "
        f"about 1,100 with 2 to 4 threads in bench_data.py, against 70,000-330,000 from shards); "
        f"run `ehm-prepare --source {spec} --out DIR --size {image_size}` once and train with --data shards:DIR",
        stacklevel=3,
    )
    return images


@dataclass(frozen=True)
class ImageSubset:
    """A fixed subset of a data source's images (what evaluation compares with), read as they are
    stored: uint8 [b, C, S, S] batches, no flips, no scaling."""

    images: ImageCollection
    indices: np.ndarray  # ascending, so reads go in storage order

    def __len__(self) -> int:
        return len(self.indices)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        images = self.images
        for a in range(0, len(self.indices), batch_size):
            idx = self.indices[a : a + batch_size]
            out = np.empty((len(idx), images.channels, images.image_size, images.image_size), dtype=np.uint8)
            images.gather(idx, out)
            yield torch.from_numpy(out)


def random_subset(spec: str, image_size: int, num_images: int, *, seed: int = 0) -> ImageSubset:
    """`num_images` images of `spec` drawn at random by `seed` (all of them if there are fewer), RGB."""
    images = open_images_for_training(spec, image_size)
    n = min(num_images, len(images))
    return ImageSubset(images, np.sort(np.random.default_rng(seed).permutation(len(images))[:n]))


def open_data(
    spec: str,
    image_size: int,
    *,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    channels: int = 3,
    workers: int | None = None,
    prefetch: int = 4,
    flip: bool = True,
) -> BatchLoader:
    """The trainer's entry point: an infinite, resumable loader of [-1, 1] batches for `spec`
    (digits, shards:DIR, lsun:PATH, folder:PATH, zip:PATH). Raises ValueError or
    FileNotFoundError with a one-line message for a bad spec or path."""
    images = open_images_for_training(spec, image_size, channels)
    return BatchLoader(
        images,
        batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        device=device,
        dtype=dtype,
        flip=flip,
        workers=workers,
        prefetch=prefetch,
    )
