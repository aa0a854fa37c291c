"""Ingest: COCO-format datasets, prefixes of image files, and the synthetic generator → datasets
of image shards (:mod:`pipeline.dataset`).

Every ingest streams: files are read by a bounded pool of threads (many small objects need
concurrency, not bandwidth) and written out shard by shard, so memory stays bounded by the shard
size whatever the dataset size. Nothing is dropped silently: every input becomes a row or is listed
in the descriptor with its reason (``rejected``; repaired annotations under ``cleaned``; files that
are not images under ``skipped``).

Every ingest holds the dataset's lease (``DATA_URI/_lease.json``, ``pipeline.lease``) from before it
reads the descriptor until the new one is written: a second ingest into the same dataset waits
``lease_wait_s`` for it or is refused with the holder named.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, get_args

import numpy as np
from PIL import Image

from . import storage
from .dataset import DEFAULT_SHARD_SIZE, Dataset, DatasetWriter
from .decode import DecodeError, probe
from .jobs import IngestSpec, Listing
from .lease import Lease, lease_uri
from .storage import StorageOptions

LISTINGS = get_args(Listing)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
READ_THREADS = 16
# Read-ahead limits: files fetched or waiting to be consumed at most, and bytes fetched but not yet
# consumed at most. Memory stays below about READ_BUDGET_BYTES plus READ_THREADS files in transfer.
READ_WINDOW = 64
READ_BUDGET_BYTES = 256 * 1024 * 1024
Progress = Callable[[int], None] | None


def dataset_lease(out_uri: str, what: str, storage_options: StorageOptions | None, wait_s: float = 0.0) -> Lease:
    """The lease an ingest holds on the dataset at ``out_uri`` (not yet acquired: use ``with``)."""
    run_id = f"ingest-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return Lease(lease_uri(out_uri), run_id=run_id, what=what, wait_s=wait_s, storage_options=storage_options)


def read_many(
    uris: Iterable[str],
    storage_options: StorageOptions | None = None,
    *,
    threads: int = READ_THREADS,
    window: int = READ_WINDOW,
    budget_bytes: int = READ_BUDGET_BYTES,
) -> Iterator[tuple[str, bytes | storage.StorageError]]:
    """``(uri, bytes or the StorageError)`` in input order, fetched by ``threads`` threads ahead
    of the consumer: at most ``threads`` transfers at a time, at most ``window`` files ahead, and
    no new transfer while the files fetched but not yet consumed hold ``budget_bytes`` or more.
    """
    pending: deque[tuple[str, Future]] = deque()

    def read(uri: str) -> bytes | storage.StorageError:
        try:
            return storage.read_bytes(uri, storage_options)
        except storage.StorageError as exc:
            return exc

    def fetched_bytes() -> int:
        return sum(
            len(result) for _, future in pending if future.done() and isinstance(result := future.result(), bytes)
        )

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for uri in uris:
            while True:
                if pending and (len(pending) >= window or fetched_bytes() >= budget_bytes):
                    head_uri, head = pending.popleft()
                    yield head_uri, head.result()
                    continue
                in_transfer = [future for _, future in pending if not future.done()]
                if len(in_transfer) < threads:
                    break
                wait(in_transfer, return_when=FIRST_COMPLETED)
            pending.append((uri, pool.submit(read, uri)))
        while pending:
            head_uri, head = pending.popleft()
            yield head_uri, head.result()


# --------------------------------------------------------------------------------------- COCO


def ingest_coco(
    images_uri: str,
    annotations_uri: str,
    out_uri: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    storage_options: StorageOptions | None = None,
    progress: Progress = None,
    lease_wait_s: float = 0.0,
) -> Dataset:
    """A COCO instances JSON and its images folder/prefix → a labelled dataset.

    Boxes go from COCO ``xywh`` to ``xyxy``; ``iscrowd`` is kept; category ids map to contiguous
    labels ``1..K`` in id order (names and source ids kept). ``image_id`` is the COCO id as a string.
    Rules for bad inputs: an image listed in the JSON but missing, undecodable, or whose decoded
    size differs from the JSON's (including an EXIF rotation that swaps it: its boxes would be
    ambiguous) is rejected with the reason; an annotation with non-positive size, an unknown
    category or lying entirely outside its image is rejected, naming the annotation id; one reaching
    partly outside is clipped and listed under ``cleaned``. Of entries sharing an image id or an
    annotation id the first is kept and the others are rejected. Files not listed in the JSON are
    not inputs of a COCO dataset and are ignored.

    Images stream through (memory bounded by the shard size); the annotation JSON is parsed whole,
    as COCO files are single JSON documents.
    """
    try:
        coco = json.loads(storage.read_bytes(annotations_uri, storage_options))
    except ValueError as exc:
        raise ValueError(f"{storage.redact(annotations_uri)} is not valid JSON: {exc}") from exc
    categories, label_of = _coco_categories(coco, annotations_uri)
    source = {
        "kind": "coco",
        "images": storage.redact(images_uri),
        "annotations": storage.redact(annotations_uri),
        "labelled": True,
    }
    what = f"ingest COCO {storage.redact(annotations_uri)}"
    with dataset_lease(out_uri, what, storage_options, lease_wait_s) as lease:
        writer = DatasetWriter(
            out_uri,
            categories=categories,
            source=source,
            shard_size=shard_size,
            storage_options=storage_options,
            lease=lease,
        )
        images = _coco_images(coco, writer)
        annotations_of = _coco_annotations(coco, {image["id"] for image in images}, writer)
        uris = (storage.join(images_uri, image["file_name"]) for image in images)
        for done, (image, (uri, data)) in enumerate(zip(images, read_many(uris, storage_options)), start=1):
            image_id = str(image["id"])
            if isinstance(data, storage.StorageError):
                reason = "missing file" if not data.transient else f"unreadable: {data}"
                writer.reject(f"image {image_id} ({image['file_name']})", reason)
            else:
                _add_coco_image(writer, image, image_id, uri, data, annotations_of.pop(image["id"], []), label_of)
            if progress is not None:
                progress(done)
        return writer.close()


def _coco_images(coco: Any, writer: DatasetWriter) -> list[dict]:
    """The usable image entries of a COCO JSON; the others rejected with the reason."""
    images: list[dict] = []
    first_file_of: dict[Any, str] = {}
    for position, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or not _is_id(image.get("id")) or not isinstance(image.get("file_name"), str):
            writer.reject(f"images[{position}]", "an image entry needs an integer or string id and a file_name")
        elif image["id"] in first_file_of:
            writer.reject(
                f"image {image['id']} ({image['file_name']})",
                f"duplicate image id (first listed for {first_file_of[image['id']]})",
            )
        else:
            first_file_of[image["id"]] = image["file_name"]
            images.append(image)
    return images


def _coco_annotations(coco: Any, image_ids: set[Any], writer: DatasetWriter) -> dict[Any, list[dict]]:
    """The annotations of a COCO JSON by image id; those without a usable id or image rejected."""
    annotations_of: dict[Any, list[dict]] = defaultdict(list)
    annotation_ids: set[Any] = set()
    for position, annotation in enumerate(coco["annotations"]):
        if not isinstance(annotation, dict) or not _is_id(annotation.get("id")):
            writer.reject(f"annotations[{position}]", "an annotation needs an integer or string id")
        elif annotation["id"] in annotation_ids:
            writer.reject(f"annotation {annotation['id']}", "duplicate annotation id (the first one is kept)")
        elif not _is_id(annotation.get("image_id")) or annotation["image_id"] not in image_ids:
            annotation_ids.add(annotation["id"])
            writer.reject(f"annotation {annotation['id']}", f"refers to unknown image {annotation.get('image_id')}")
        else:
            annotation_ids.add(annotation["id"])
            annotations_of[annotation["image_id"]].append(annotation)
    return annotations_of


def _is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and bool(value))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _coco_categories(coco: Any, annotations_uri: str) -> tuple[list[dict[str, Any]], dict[Any, int]]:
    """The dataset's categories (labels ``1..K`` in COCO id order) and ``{coco id: label}``; a
    file that is not a COCO instances file is a ``ValueError`` naming it."""
    where = storage.redact(annotations_uri)
    if not isinstance(coco, dict):
        raise ValueError(f"{where} is not a COCO instances file: not a JSON object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise ValueError(f"{where} is not a COCO instances file: no {key!r} list")
    for category in coco["categories"]:
        named = isinstance(category, dict) and isinstance(category.get("name"), str)
        if not named or not _is_id(category.get("id")):
            raise ValueError(f"{where}: category {category!r} needs an id and a name")
    ids = [category["id"] for category in coco["categories"]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: duplicate category ids {sorted({i for i in ids if ids.count(i) > 1}, key=str)}")
    ordered = sorted(coco["categories"], key=lambda c: (isinstance(c["id"], str), c["id"]))
    label_of = {category["id"]: label for label, category in enumerate(ordered, start=1)}
    categories = [{"label": label_of[c["id"]], "name": c["name"], "source_id": c["id"]} for c in ordered]
    return categories, label_of


def _add_coco_image(
    writer: DatasetWriter,
    image: dict,
    image_id: str,
    uri: str,
    data: bytes,
    annotations: list[dict],
    label_of: dict[Any, int],
) -> None:
    size = probe(data, image_id)
    if isinstance(size, DecodeError):
        writer.reject(f"image {image_id} ({image['file_name']})", size.message)
        return
    width, height = size
    declared = (image.get("width"), image.get("height"))
    if declared != (None, None) and declared != (width, height):
        swapped = declared == (height, width)
        why = "EXIF orientation swaps it to" if swapped else "the file is"
        writer.reject(
            f"image {image_id} ({image['file_name']})",
            f"annotated as {declared[0]}×{declared[1]} but {why} {width}×{height}: boxes would be misplaced",
        )
        return
    boxes, labels, crowd = [], [], []
    for annotation in annotations:
        name = f"annotation {annotation.get('id')} (image {image_id})"
        bbox = annotation.get("bbox")
        if not _is_id(annotation.get("category_id")) or annotation["category_id"] not in label_of:
            writer.reject(name, f"unknown category {annotation.get('category_id')}")
            continue
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            writer.reject(name, f"malformed bbox {bbox!r}")
            continue
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            writer.reject(name, f"non-positive size {w}×{h}")
            continue
        x1, y1, x2, y2 = x, y, x + w, y + h
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
        if cx2 <= cx1 or cy2 <= cy1:
            writer.reject(name, f"box {[x1, y1, x2, y2]} lies outside the {width}×{height} image")
            continue
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            writer.clean(name, f"box {[x1, y1, x2, y2]} clipped to the {width}×{height} image")
        boxes.append([cx1, cy1, cx2, cy2])
        labels.append(label_of[annotation["category_id"]])
        crowd.append(bool(annotation.get("iscrowd", 0)))
    writer.add(image_id, data, uri, width=width, height=height, gt_boxes=boxes, gt_labels=labels, gt_iscrowd=crowd)


# ------------------------------------------------------------------------------ image prefix


def list_images(
    prefix_uri: str, storage_options: StorageOptions | None = None, *, after: str | None = None
) -> tuple[list[str], list[str]]:
    """Image files under ``prefix_uri`` (recursively, suffix case-insensitive) and the other files;
    with ``after``, only those whose path below the prefix sorts after it (``storage.list_files``)."""
    files = storage.list_files(prefix_uri, storage_options, recursive=True, after=after)
    images = [u for u in files if u.lower().endswith(IMAGE_SUFFIXES)]
    others = [u for u in files if not u.lower().endswith(IMAGE_SUFFIXES)]
    return images, others


def ingest_images(
    prefix_uri: str,
    out_uri: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    storage_options: StorageOptions | None = None,
    only_new: bool = False,
    listing: str = "full",
    progress: Progress = None,
    lease_wait_s: float = 0.0,
) -> Dataset:
    """Every image file under a prefix → an unlabelled dataset; ``image_id`` is the path relative
    to the prefix (so equal names in different folders stay distinct).

    A file with an image suffix whose header cannot be read still becomes a row (width/height null)
    and is listed under ``invalid``: inference reports it as one error row. A file that cannot be
    read at all is ``rejected``; files without an image suffix are counted (and listed, up to
    ``MAX_LISTED``) under ``skipped``. ``only_new`` appends to an existing dataset only the files
    whose source URI it does not hold yet (incremental ingest: the listed files are probed in the
    dataset's index of known sources); ``skipped`` then describes the latest listing.

    ``listing``: ``"full"`` lists the whole prefix; ``"after-last"`` (with ``only_new``) lists only
    the paths that sort after the last one an earlier ingest of this prefix listed (the dataset's
    ``source.last_listed``): for prefixes whose new files always sort last, such as the documented
    date-partitioned layout ``incoming/2026/11/30/…``. A file that arrives under a name sorting
    before that is not seen until a ``"full"`` listing. The dataset's lease is held from before the
    descriptor is read (see the module docstring); an image another writer appended meanwhile is not
    added twice.
    """
    if listing not in LISTINGS:
        raise ValueError(f"listing must be one of {', '.join(LISTINGS)}, not {listing!r}")
    prefix = storage.normalize(prefix_uri)
    what = f"ingest images from {storage.redact(prefix)}"
    source = {"kind": "images", "prefix": storage.redact(prefix), "labelled": False}
    with dataset_lease(out_uri, what, storage_options, lease_wait_s) as lease:
        writer = DatasetWriter(
            out_uri,
            categories=[],
            source=source,
            shard_size=shard_size,
            storage_options=storage_options,
            append=only_new,
            lease=lease,
        )
        after = _listed_after(writer.existing, source, listing) if only_new else None
        images, others = list_images(prefix, storage_options, after=after)
        if not images and not others and after is None:
            raise ValueError(f"no files under {storage.redact(prefix)}")
        if images or others:
            writer.source["last_listed"] = storage.relative_path(max(images + others), prefix)
        if only_new and writer.existing is not None and writer.existing.shards:
            images = _new_images(writer, prefix, images)
            if not images:  # nothing new: the dataset is left as it is, not even rewritten
                return writer.existing
            if after is None:
                writer.clear_skipped()
        return _add_images(writer, prefix, images, others, storage_options, progress)


def _listed_after(existing: Dataset | None, source: dict, listing: str) -> str | None:
    """Where an ``"after-last"`` listing starts: the last path listed by an earlier ingest of the
    same prefix; None (list everything) for a full listing or a first ingest."""
    if listing != "after-last" or existing is None or existing.source.get("prefix") != source["prefix"]:
        return None
    return existing.source.get("last_listed")


def _new_images(writer: DatasetWriter, prefix: str, images: list[str]) -> list[str]:
    """The listed images whose source the dataset does not hold (one probe of its index), their
    ids looked up in one probe too."""
    held = writer.held("source", images)
    new = [uri for uri in images if uri not in held]
    writer.reserve(storage.relative_path(uri, prefix) for uri in new)
    return new


def _add_images(
    writer: DatasetWriter,
    prefix: str,
    images: list[str],
    others: list[str],
    storage_options: StorageOptions | None,
    progress: Progress,
) -> Dataset:
    """The listed files of an image-prefix ingest into ``writer``; the dataset once written."""
    for other in others:
        writer.skip(storage.relative_path(other, prefix))
    for done, (uri, data) in enumerate(read_many(images, storage_options), start=1):
        image_id = storage.relative_path(uri, prefix)
        if isinstance(data, storage.StorageError):
            writer.reject(image_id, f"unreadable: {data}")
        else:
            size = probe(data, image_id)
            if isinstance(size, DecodeError):
                if writer.add(image_id, data, uri):
                    writer.mark_invalid(image_id, size.message)
            else:
                writer.add(image_id, data, uri, width=size[0], height=size[1])
        if progress is not None:
            progress(done)
    return writer.close()


# --------------------------------------------------------------------------------- synthetic


def encode_png(image_chw: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8 [3,H,W]`` RGB array (lossless, deterministic)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image_chw.transpose(1, 2, 0))).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def ingest_synthetic(
    out_uri: str,
    *,
    num_images: int,
    seed: int = 0,
    image_size: int = 128,
    shard_size: int = DEFAULT_SHARD_SIZE,
    storage_options: StorageOptions | None = None,
    progress: Progress = None,
    lease_wait_s: float = 0.0,
) -> Dataset:
    """``num_images`` generated images of simple shapes with exact boxes (PNG), deterministic in
    ``seed``: the same arguments give the same bytes."""
    from detector.synthetic import CATEGORIES, make_image

    if num_images < 1:
        raise ValueError(f"--images must be ≥ 1, got {num_images}")
    categories = [{"label": i + 1, "name": name, "source_id": i + 1} for i, name in enumerate(CATEGORIES)]
    with dataset_lease(out_uri, f"synthetic dataset (seed {seed})", storage_options, lease_wait_s) as lease:
        writer = DatasetWriter(
            out_uri,
            categories=categories,
            source={"kind": "synthetic", "seed": seed, "image_size": image_size, "labelled": True},
            shard_size=shard_size,
            storage_options=storage_options,
            lease=lease,
        )
        for index in range(num_images):
            sample = make_image(seed, index, image_size)
            writer.add(
                f"synth-{seed}-{index:07d}",
                encode_png(sample.image.numpy()),
                f"synthetic://{seed}/{index}",
                width=image_size,
                height=image_size,
                gt_boxes=sample.boxes.numpy(),
                gt_labels=sample.labels.numpy(),
                gt_iscrowd=[False] * len(sample.labels),
            )
            if progress is not None:
                progress(index + 1)
        return writer.close()


# --------------------------------------------------------------------------------- the job


def ingest(spec: IngestSpec, progress: Progress = None) -> Dataset:
    """Run an ingest job: ``spec.source`` decides which of the ingesters above reads the input."""
    if spec.source == "coco":
        return ingest_coco(
            spec.images_uri,
            spec.annotations_uri,
            spec.out_uri,
            shard_size=spec.shard_size,
            storage_options=spec.storage,
            progress=progress,
            lease_wait_s=spec.lease_wait_s,
        )
    if spec.source == "images":
        return ingest_images(
            spec.images_uri,
            spec.out_uri,
            shard_size=spec.shard_size,
            only_new=spec.only_new,
            listing=spec.listing,
            storage_options=spec.storage,
            progress=progress,
            lease_wait_s=spec.lease_wait_s,
        )
    return ingest_synthetic(
        spec.out_uri,
        num_images=spec.num_images,
        seed=spec.seed,
        image_size=spec.image_size,
        shard_size=spec.shard_size,
        storage_options=spec.storage,
        progress=progress,
        lease_wait_s=spec.lease_wait_s,
    )
