"""The input stream of training: which images each worker sees in each epoch, in which batches.

Each epoch, the shards are shuffled (seed + epoch) and their rows shuffled within each shard; the
resulting stream of images is cut into one contiguous, equal-length chunk per worker. Every image
is seen once per epoch (all but fewer than ``world`` of them, so that every worker takes the same
number of steps, as DDP requires), each worker reads only the shards its chunk overlaps, and the
workers' chunks are disjoint. Within a chunk, images are grouped into batches of similar aspect
ratio (less padding) and flipped horizontally with probability 0.5.

The order, the grouping and the flips are a pure function of ``(seed, epoch, rank)``: a worker
restored in the middle of an epoch asks for the batches from index ``skip`` on and gets exactly
the batches a full pass would have given from there, without reading or decoding the earlier ones.

Shape shorthand: a batch is ``(image_ids, images, targets)``; ``images`` are float ``[3,H,W]`` in
``[0,1]``; each target holds ``boxes`` float32 ``[N,4]`` (xyxy, pixels of the flipped image) and
``labels`` int64 ``[N]`` (crowd boxes dropped).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from ..dataset import Dataset, gt_targets, read_shard
from ..decode import DecodedImage, decode_many
from ..storage import StorageOptions

Batch = tuple[list[str], list[torch.Tensor], list[dict[str, torch.Tensor]]]
Row = tuple[pa.Table, int]  # a shard's table and a row in it
GROUP_WINDOW = 8  # batches whose images are grouped by aspect ratio together


def epoch_chunk(dataset: Dataset, seed: int, epoch: int, rank: int, world: int) -> list[tuple[int, int]]:
    """``(shard index, row)`` pairs of worker ``rank``'s share of ``epoch`` (see the module docstring)."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(dataset.shards)))
    rng.shuffle(order)
    stream: list[tuple[int, int]] = []
    for shard_index in order:
        rows = list(range(dataset.shards[shard_index].num_images))
        rng.shuffle(rows)
        stream += [(shard_index, row) for row in rows]
    length = len(stream) // world
    return stream[rank * length : (rank + 1) * length]


def steps_per_epoch(dataset: Dataset, world: int, batch_size: int) -> int:
    """Batches (optimisation steps) of each worker per epoch."""
    return math.ceil((dataset.num_images // world) / batch_size)


def epoch_batches(
    dataset: Dataset,
    chunk: list[tuple[int, int]],
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    hflip: bool,
    storage_options: StorageOptions | None,
    skip: int = 0,
    group_window: int = GROUP_WINDOW,
) -> Iterator[Batch]:
    """The batches of one worker's ``chunk``, from batch index ``skip`` on: images grouped by aspect
    ratio within windows of ``group_window`` batches, the groups of a window shuffled. Batches
    before ``skip`` are not decoded, and shards only they need are not read; undecodable images are
    left out of their batch."""
    rng = random.Random(f"{seed}:{epoch}:{rank}:batches")
    tables: dict[int, pa.Table] = {}
    window = batch_size * group_window
    index = 0  # of the next batch
    for start in range(0, len(chunk), window):
        part = chunk[start : start + window]
        count = math.ceil(len(part) / batch_size)
        if index + count <= skip:
            _draw_window(rng, count, len(part), hflip)
            index += count
            continue
        _load_tables(tables, dataset, part, storage_options)
        for group in _window_groups([(tables[s], r) for s, r in part], batch_size, rng):
            flips = [hflip and rng.random() < 0.5 for _ in group]  # drawn whether decoded or not
            if index >= skip:
                yield _decode_batch(group, flips)
            index += 1


def _draw_window(rng: random.Random, count: int, images: int, hflip: bool) -> None:
    """Advance ``rng`` exactly as a window of ``count`` groups and ``images`` images does."""
    rng.shuffle([None] * count)  # the draws of a shuffle depend only on the length
    if hflip:
        for _ in range(images):
            rng.random()


def _load_tables(
    tables: dict[int, pa.Table], dataset: Dataset, part: list[tuple[int, int]], storage_options: StorageOptions | None
) -> None:
    """Keep in ``tables`` exactly the shards ``part`` reads (each read once while it is needed)."""
    needed = {shard_index for shard_index, _ in part}
    for old in [s for s in tables if s not in needed]:
        del tables[old]
    for shard_index in sorted(needed - set(tables)):
        tables[shard_index] = read_shard(dataset.shards[shard_index].uri, storage_options=storage_options)


def _window_groups(rows: list[Row], batch_size: int, rng: random.Random) -> list[list[Row]]:
    """``rows`` sorted by aspect ratio, cut into batches, the batches shuffled."""
    ratios = [(t.column("height")[r].as_py() or 1) / (t.column("width")[r].as_py() or 1) for t, r in rows]
    ordered = [rows[i] for i in np.argsort(ratios, kind="stable")]
    groups = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(groups)
    return groups


def _decode_batch(group: list[Row], flips: list[bool]) -> Batch:
    items = [(t.column("image_id")[r].as_py(), t.column("image")[r].as_py()) for t, r in group]
    decoded = decode_many(items, threads=2)
    ids: list[str] = []
    images: list[torch.Tensor] = []
    targets: list[dict[str, torch.Tensor]] = []
    for (table, row), item, flip in zip(group, decoded, flips):
        if not isinstance(item, DecodedImage):
            continue
        boxes, labels, crowd = gt_targets(table.slice(row, 1))[0]
        keep = ~crowd
        image, boxes_t = item.image, torch.from_numpy(boxes[keep]).reshape(-1, 4)
        if flip:
            image, boxes_t = _flipped(item, boxes_t)
        ids.append(item.image_id)
        images.append(image.float() / 255)
        targets.append({"boxes": boxes_t, "labels": torch.from_numpy(labels[keep]).to(torch.int64)})
    return ids, images, targets


def _flipped(item: DecodedImage, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image mirrored left-right, and its boxes ``[N,4]`` with it."""
    width = item.width
    return item.image.flip(-1), torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
