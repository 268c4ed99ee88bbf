"""`ehm-prepare`: decode a source once, in parallel, into packed uint8 shards.

    ehm-prepare --source lsun:PATH --out DIR --size 64 [--workers N] [--shard-size 10000]

Shard j holds the decodable images of source entries [j * shard_size, (j + 1) * shard_size), so
the plan is fixed by the source and the arguments; a rerun skips every shard whose file matches
its recorded checksum and redoes the rest.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from . import shards as fmt
from .images import DecodedImages
from .spec import IMAGE_KINDS, open_images, parse_spec

PLAN = "prepare.json"
IN_FLIGHT_PER_WORKER = 4  # spans queued per worker: keeps them busy, bounds memory and what an error waits for
_DATASET: DecodedImages | None = None  # the source in each worker process


def _init_worker(dataset: DecodedImages) -> None:
    global _DATASET
    _DATASET = dataset


def _decode_range(span: tuple[int, int]) -> tuple[int, np.ndarray, list[str]]:
    """Decodes source entries [start, end): (start, images [n, 3, S, S], names of skipped ones)."""
    start, end = span
    ds = _DATASET
    out = np.empty((end - start, ds.channels, ds.image_size, ds.image_size), dtype=np.uint8)
    n, skipped = 0, []
    for i in range(start, end):
        img = ds.try_load(i)
        if img is None:
            skipped.append(ds.source.name(i))
        else:
            out[n] = img
            n += 1
    return start, out[:n], skipped


def _decoded(dataset: DecodedImages, spans: list[tuple[int, int]], workers: int) -> Iterator[tuple[int, np.ndarray, list[str]]]:
    """The decoded spans in order, from `workers` processes with a few spans in flight each.

    On an error or an interruption the spans not yet started are cancelled and the running ones
    finish (a chunk each): multiprocessing.Pool.terminate can hang while its task feeder holds the
    queue's lock, which stalled a two-core test machine for good."""
    if workers == 1:
        _init_worker(dataset)
        yield from map(_decode_range, spans)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(dataset,))
    window: deque[Future] = deque()
    todo = iter(spans)
    try:
        while True:
            while len(window) < IN_FLIGHT_PER_WORKER * workers and (span := next(todo, None)) is not None:
                window.append(pool.submit(_decode_range, span))
            if not window:
                return
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_plan(out: Path, plan: dict) -> None:
    """Refuses to mix shards of a different source or size into `out`."""
    path = out / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in plan.items() if old.get(k) != v)
            raise ValueError(f"{out} holds a preparation with other settings ({diff}): choose another --out or delete it")
    else:
        path.write_text(json.dumps(plan, indent=1))


def prepare(
    source: str,
    out: str | os.PathLike,
    image_size: int = 64,
    *,
    workers: int | None = None,
    shard_size: int = 10_000,
    chunk_size: int = 128,
    progress: bool = True,
) -> dict:
    """Decodes every image of `source` (lsun:/folder:/zip: spec) into shards under `out`; returns
    the index (also written to out/index.json) with a `report` entry for this run."""
    kind, path = parse_spec(source)
    if kind not in IMAGE_KINDS:
        raise ValueError("--source must be one of " + ", ".join(f"{k}:PATH" for k in IMAGE_KINDS) + f", got {source!r}")
    if shard_size < 1 or chunk_size < 1:
        raise ValueError("shard_size and chunk_size must be positive")
    t0 = time.perf_counter()
    source = f"{kind}:{Path(path).resolve()}"
    dataset = open_images(source, image_size)
    n = len(dataset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"source": source, "image_size": image_size, "channels": dataset.channels, "shard_size": shard_size, "source_items": n}
    _check_plan(out, plan)

    num_shards = -(-n // shard_size)
    records: list[dict | None] = [fmt.finished_shard(out, j) for j in range(num_shards)]
    todo = [j for j in range(num_shards) if records[j] is None]
    spans = [
        (a, min(a + chunk_size, (j + 1) * shard_size, n))
        for j in todo
        for a in range(j * shard_size, min((j + 1) * shard_size, n), chunk_size)
    ]
    done_items = n - sum(b - a for a, b in spans)
    workers = max(1, min(workers or os.cpu_count() or 1, len(spans) or 1))

    from tqdm import tqdm

    pending: dict[int, list[np.ndarray]] = {}
    skipped_names: list[str] = []
    bar = tqdm(total=n, initial=done_items, unit="img", desc="ehm-prepare", disable=not progress, smoothing=0.1)
    with bar, closing(_decoded(dataset, spans, workers)) as results:
        for (a, b), (start, images, skipped) in zip(spans, results):
            j = start // shard_size
            pending.setdefault(j, []).append(images)
            skipped_names += skipped
            bar.update(b - a)
            if b == min((j + 1) * shard_size, n):
                parts = pending.pop(j)
                meta = {"source_range": [j * shard_size, b], "skipped": (b - j * shard_size) - sum(len(p) for p in parts)}
                records[j] = fmt.write_shard(out, j, np.concatenate(parts), meta)

    index = fmt.write_index(out, plan, records)
    seconds = time.perf_counter() - t0
    written = sum(records[j]["count"] for j in todo)
    index["report"] = {
        "written": written,
        "skipped": sum(records[j]["skipped"] for j in todo),
        "skipped_names": skipped_names,
        "shards_written": len(todo),
        "shards_resumed": num_shards - len(todo),
        "workers": workers,
        "seconds": seconds,
        "images_per_s": (n - done_items) / seconds if seconds > 0 else float("nan"),
    }
    return index


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ehm-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="lsun:PATH (an LMDB or a folder of them), folder:PATH or zip:PATH")
    p.add_argument("--out", required=True, help="output folder for the shards and index.json")
    p.add_argument("--size", type=int, default=64, help="square image size in pixels (default 64)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--shard-size", type=int, default=10_000, help="source entries per shard (default 10000)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        index = prepare(args.source, args.out, args.size, workers=args.workers, shard_size=args.shard_size, progress=not args.quiet)
    except (ValueError, FileNotFoundError) as err:
        print(f"ehm-prepare: error: {err}", file=sys.stderr)
        return 2
    r = index["report"]
    print(
        f"ehm-prepare: {index['num_images']} images in {len(index['shards'])} shards at {args.out} "
        f"({r['written']} written now in {r['shards_written']} shards, {r['shards_resumed']} shards already done); "
        f"skipped {r['skipped']} undecodable; {r['seconds']:.1f} s, {r['images_per_s']:.0f} images/s with {r['workers']} workers"
    )
    for name in r["skipped_names"][:10]:
        print(f"  skipped: {name}")
    if len(r["skipped_names"]) > 10:
        print(f"  ... and {len(r['skipped_names']) - 10} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
