"""The input stream of training: which images each worker sees in each epoch, in which batches,
and the loader that reads and decodes them ahead of the step.

Each epoch, the shards are shuffled (seed + epoch) and their rows shuffled within each shard; the
resulting stream of images is cut into one contiguous, equal-length chunk per worker. Every image
is seen once per epoch (all but fewer than ``world`` of them, so that every worker takes the same
number of steps, as DDP requires), each worker reads only the shards its chunk overlaps, and the
workers' chunks are disjoint. Within a chunk, images are grouped into batches of similar aspect
ratio (less padding) and flipped horizontally with probability 0.5.

The order, the grouping and the flips are a pure function of ``(seed, epoch, rank)``: a worker
restored in the middle of an epoch asks for the batches from index ``skip`` on and gets exactly
the batches a full pass would have given from there, without reading or decoding the earlier ones.

:class:`RunBatches` is a training worker's whole run (from the step it is at to the last) as a
``torch.utils.data.IterableDataset``: in a ``DataLoader`` with ``N`` worker processes
(:func:`batch_loader`), loader worker ``k`` reads, decodes, builds the targets of and flips
batches ``k, k+N, …`` while the model steps, and the loader hands them out in order; at most
``N × PREFETCH`` batches wait in memory (pinned on CUDA). Shards are read whole and kept while
their window of batches needs them; the columns are read as arrays (ratios, ground truth), never
cell by cell.

Shape shorthand: a batch is ``(image_ids, images, targets)``; ``images`` are ``uint8 [3,H,W]``
(the step scales them to ``[0,1]`` on its device); each target holds ``boxes`` float32 ``[N,4]``
(xyxy, pixels of the flipped image) and ``labels`` int64 ``[N]`` (crowd boxes dropped).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..dataset import Dataset, read_shard
from ..decode import DecodedImage, decode_many
from ..storage import StorageOptions

Batch = tuple[list[str], list[torch.Tensor], list[dict[str, torch.Tensor]]]
Group = list[tuple[int, int]]  # a planned batch: (shard index, row) pairs
GROUP_WINDOW = 8  # batches whose images are grouped by aspect ratio together
PREFETCH = 2  # batches each loader worker prepares ahead


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


@dataclass(frozen=True)
class StreamSettings:
    """What shapes a worker's stream besides the epoch and the rank."""

    batch_size: int
    seed: int
    hflip: bool
    storage_options: StorageOptions | None
    group_window: int = GROUP_WINDOW


class _Shards:
    """The shard tables a window needs, each read once while needed, with its rows' aspect ratios."""

    def __init__(self, dataset: Dataset, storage_options: StorageOptions | None):
        self.dataset, self.storage_options = dataset, storage_options
        self.tables: dict[int, tuple[pa.Table, np.ndarray]] = {}

    def keep(self, part: Group) -> None:
        needed = {shard_index for shard_index, _ in part}
        for old in [s for s in self.tables if s not in needed]:
            del self.tables[old]
        for shard_index in sorted(needed - set(self.tables)):
            uri = self.dataset.shards[shard_index].uri
            table = read_shard(uri, storage_options=self.storage_options)
            self.tables[shard_index] = (table, _ratios(table))

    def ratio(self, shard_index: int, row: int) -> float:
        return float(self.tables[shard_index][1][row])

    def rows(self, group: Group) -> pa.Table:
        """The rows of ``group``, in its order, as one table (one ``take`` per shard)."""
        order = list(dict.fromkeys(shard_index for shard_index, _ in group))
        if len(order) == 1:
            return self.tables[order[0]][0].take([row for _, row in group])
        parts, positions = [], []
        for shard_index in order:
            picked = [at for at, (s, _) in enumerate(group) if s == shard_index]
            parts.append(self.tables[shard_index][0].take([group[at][1] for at in picked]))
            positions += picked
        return pa.concat_tables(parts).take(np.argsort(positions))


def _ratios(table: pa.Table) -> np.ndarray:
    """Height / width of every row (1 for an unknown or zero side)."""

    def side(name: str) -> np.ndarray:
        values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        return np.where(np.isfinite(values) & (values > 0), values, 1.0)

    return side("height") / side("width")


def planned_batches(
    dataset: Dataset, chunk: Group, settings: StreamSettings, *, epoch: int, rank: int, skip: int = 0
) -> Iterator[tuple[int, _Shards, Group, list[bool]]]:
    """``(index, shards, group, flips)`` for every batch of ``chunk`` from index ``skip`` on: images
    grouped by aspect ratio within windows of ``group_window`` batches, the groups of a window
    shuffled. Nothing is decoded here; windows wholly before ``skip`` are not read either."""
    rng = random.Random(f"{settings.seed}:{epoch}:{rank}:batches")
    shards = _Shards(dataset, settings.storage_options)
    window = settings.batch_size * settings.group_window
    index = 0  # of the next batch
    for start in range(0, len(chunk), window):
        part = chunk[start : start + window]
        count = math.ceil(len(part) / settings.batch_size)
        if index + count <= skip:
            _draw_window(rng, count, len(part), settings.hflip)
            index += count
            continue
        shards.keep(part)
        ordered = sorted(part, key=lambda item: shards.ratio(*item))  # stable: ties keep stream order
        groups = [ordered[i : i + settings.batch_size] for i in range(0, len(ordered), settings.batch_size)]
        rng.shuffle(groups)
        for group in groups:
            flips = [settings.hflip and rng.random() < 0.5 for _ in group]  # drawn whether decoded or not
            if index >= skip:
                yield index, shards, group, flips
            index += 1


def epoch_batches(
    dataset: Dataset,
    chunk: Group,
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
    """The batches of one worker's ``chunk`` from batch index ``skip`` on, decoded in this process
    (:func:`planned_batches`); undecodable images are left out of their batch."""
    settings = StreamSettings(batch_size, seed, hflip, storage_options, group_window)
    for _, shards, group, flips in planned_batches(dataset, chunk, settings, epoch=epoch, rank=rank, skip=skip):
        yield decode_batch(shards.rows(group), flips)


def _draw_window(rng: random.Random, count: int, images: int, hflip: bool) -> None:
    """Advance ``rng`` exactly as a window of ``count`` groups and ``images`` images does."""
    rng.shuffle([None] * count)  # the draws of a shuffle depend only on the length
    if hflip:
        for _ in range(images):
            rng.random()


def decode_batch(rows: pa.Table, flips: list[bool]) -> Batch:
    """Decode the images of ``rows`` (a shard's columns), build their targets (crowd boxes
    dropped) and flip those ``flips`` says; undecodable images are left out."""
    items = list(zip(rows.column("image_id").to_pylist(), rows.column("image").to_pylist()))
    decoded = decode_many(items, threads=1)
    ids: list[str] = []
    images: list[torch.Tensor] = []
    targets: list[dict[str, torch.Tensor]] = []
    for item, (boxes, labels, crowd), flip in zip(decoded, batch_targets(rows), flips):
        if not isinstance(item, DecodedImage):
            continue
        image, boxes_t = item.image, torch.from_numpy(boxes[~crowd])
        if flip:
            image, boxes_t = _flipped(item, boxes_t)
        ids.append(item.image_id)
        images.append(image)
        targets.append({"boxes": boxes_t, "labels": torch.from_numpy(labels[~crowd])})
    return ids, images, targets


def batch_targets(rows: pa.Table) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per row: ``boxes [N,4] float32``, ``labels [N] int64``, ``iscrowd [N] bool`` — from the
    columns' flat value arrays and list lengths (a null list counts as empty; a null or short
    ``gt_iscrowd`` as not crowd)."""
    boxes = rows.column("gt_boxes").combine_chunks()
    labels = rows.column("gt_labels").combine_chunks()
    crowd = rows.column("gt_iscrowd").combine_chunks()
    counts, crowd_counts = _lengths(labels), _lengths(crowd)
    flat_boxes = boxes.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, 4)
    flat_labels = labels.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    flat_crowd = crowd.flatten().to_numpy(zero_copy_only=False).astype(bool)
    ends, crowd_ends = np.cumsum(counts), np.cumsum(crowd_counts)
    out = []
    for row, (count, end) in enumerate(zip(counts, ends)):
        at = slice(end - count, end)
        is_crowd = np.zeros(count, dtype=bool)
        if crowd_counts[row] == count:
            is_crowd = flat_crowd[crowd_ends[row] - count : crowd_ends[row]]
        out.append((flat_boxes[at], flat_labels[at], is_crowd))
    return out


def _lengths(column: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _flipped(item: DecodedImage, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The image mirrored left-right, and its boxes ``[N,4]`` with it."""
    width = item.width
    return item.image.flip(-1), torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


class RunBatches(torch.utils.data.IterableDataset):
    """Worker ``rank``'s batches of optimisation steps ``start`` to ``stop - 1``, epoch after
    epoch, as ``(epoch, batch)``. In a ``DataLoader`` of ``N`` worker processes, loader worker
    ``k`` decodes steps ``start + k``, ``start + k + N``, …; the loader returns them in order."""

    def __init__(self, dataset: Dataset, settings: StreamSettings, *, rank: int, world: int, start: int, stop: int):
        super().__init__()
        self.dataset, self.settings = dataset, settings
        self.rank, self.world, self.start, self.stop = rank, world, start, stop
        self.per_epoch = steps_per_epoch(dataset, world, settings.batch_size)

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        info = torch.utils.data.get_worker_info()
        part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start
        while step < self.stop:
            epoch = step // self.per_epoch
            chunk = epoch_chunk(self.dataset, self.settings.seed, epoch, self.rank, self.world)
            skip = step - epoch * self.per_epoch
            for index, shards, group, flips in planned_batches(
                self.dataset, chunk, self.settings, epoch=epoch, rank=self.rank, skip=skip
            ):
                step = epoch * self.per_epoch + index
                if step >= self.stop:
                    return
                if (step - self.start) % parts == part:
                    yield epoch, decode_batch(shards.rows(group), flips)
            step = (epoch + 1) * self.per_epoch


def batch_loader(
    batches: RunBatches, *, workers: int, pin_memory: bool, start_method: str | None = None
) -> Iterable[tuple[int, Batch]]:
    """``batches`` prepared ahead by ``workers`` processes (pinned memory for a CUDA step), or in
    this process, one at a time, when ``workers`` is 0. ``start_method``: how the processes start
    (multiprocessing's; default fork, on Linux)."""
    if workers == 0:
        return batches
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=PREFETCH,
        multiprocessing_context=start_method,
    )
