"""COCO evaluation (pycocotools) of detections against ground truth.

Boxes come in ``(x1, y1, x2, y2)`` pixels and are converted to COCO's ``(x, y, w, h)`` in memory;
crowd regions (``iscrowd``) are honoured as COCO does (detections matching them are neither true nor
false positives). Small/medium/large are judged by box area: datasets keep boxes, not segmentations.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUMMARY_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

log = logging.getLogger(__name__)


@dataclass
class ImageGT:
    image_id: str
    width: int
    height: int
    boxes: np.ndarray  # [N, 4] float, xyxy
    labels: np.ndarray  # [N] int, 1..K
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # [N]


@dataclass
class ImageDT:
    image_id: str
    boxes: np.ndarray  # [M, 4] float, xyxy
    scores: np.ndarray  # [M]
    labels: np.ndarray  # [M]


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)


def coco_metrics(gt: Sequence[ImageGT], dt: Sequence[ImageDT], class_names: Sequence[str]) -> dict:
    """COCO bbox metrics: AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l; ``per_class`` AP and AP50;
    ``pr_curves`` (precision at 101 recall points, IoU 0.5, area all, 100 dets) per class.

    ``class_names[label]`` names label ``label`` (index 0 is the background). Images of ``dt`` not
    in ``gt`` are an error: they would be silently ignored by pycocotools.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    index = {item.image_id: i + 1 for i, item in enumerate(gt)}
    unknown = sorted({d.image_id for d in dt} - set(index))
    if unknown:
        raise ValueError(f"detections for {len(unknown)} images without ground truth, e.g. {unknown[:3]}")
    categories = [{"id": label, "name": name} for label, name in enumerate(class_names) if label > 0]
    images, annotations = _coco_ground_truth(gt, index)
    results = _coco_results(dt, index)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        coco_gt.createIndex()
        if not results:
            return _empty_metrics(categories, len(images), len(annotations))
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    stats = [float(v) for v in evaluator.stats]
    precision = evaluator.eval["precision"]  # [T IoU, R recall, K classes, A areas, M maxdets]
    per_class, curves = [], {}
    for k, category in enumerate(categories):
        ap = _mean_valid(precision[:, :, k, 0, -1])
        ap50 = _mean_valid(precision[0, :, k, 0, -1])
        per_class.append({"label": category["id"], "name": category["name"], "AP": ap, "AP50": ap50})
        curves[category["name"]] = [float(max(p, 0.0)) for p in precision[0, :, k, 0, -1]]
    return {
        **dict(zip(SUMMARY_NAMES, stats)),
        "per_class": per_class,
        "pr_curves": {"recall": [float(r) for r in evaluator.params.recThrs], "precision": curves},
        "num_images": len(images),
        "num_gt_boxes": len(annotations),
        "num_detections": len(results),
    }


def _coco_ground_truth(gt: Sequence[ImageGT], index: dict[str, int]) -> tuple[list[dict], list[dict]]:
    """COCO ``images`` and ``annotations`` entries of the ground truth (``index``: image id → COCO id)."""
    images, annotations = [], []
    for item in gt:
        images.append({"id": index[item.image_id], "width": int(item.width), "height": int(item.height)})
        crowd = np.asarray(item.iscrowd, dtype=bool).reshape(-1)
        if crowd.size == 0:
            crowd = np.zeros(len(item.labels), dtype=bool)
        for box, label, is_crowd in zip(_xywh(item.boxes), np.asarray(item.labels).reshape(-1), crowd):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index[item.image_id],
                    "category_id": int(label),
                    "bbox": box.tolist(),
                    "area": float(box[2] * box[3]),
                    "iscrowd": int(is_crowd),
                }
            )
    return images, annotations


def _coco_results(dt: Sequence[ImageDT], index: dict[str, int]) -> list[dict]:
    """COCO result entries of the detections."""
    results = []
    for item in dt:
        scores, labels = np.asarray(item.scores).reshape(-1), np.asarray(item.labels).reshape(-1)
        for box, score, label in zip(_xywh(item.boxes), scores, labels):
            results.append(
                {
                    "image_id": index[item.image_id],
                    "category_id": int(label),
                    "bbox": box.tolist(),
                    "score": float(score),
                }
            )
    return results


def evaluate(dataset_uri: str, out_uri: str, *, storage_options=None, write: bool = True) -> dict:
    """COCO metrics of the committed detections at ``out_uri`` against the ground truth of the
    dataset at ``dataset_uri`` (images of uncommitted shards are left out of both). Writes
    ``OUT_URI/metrics.json`` and a precision-recall plot ``OUT_URI/pr_curve.png`` when ``write``."""
    from . import storage
    from .dataset import class_mismatch, open_dataset
    from .outputs import OutputStore

    dataset = open_dataset(dataset_uri, storage_options)
    if not dataset.has_labels:
        raise ValueError(f"dataset {storage.redact(dataset_uri)} has no ground-truth labels to evaluate against")
    store = OutputStore(out_uri, storage_options)
    committed = store.committed_names()
    shards = [s for s in dataset.shards if s.name in committed]
    if not shards:
        raise ValueError(f"no committed outputs of dataset {storage.redact(dataset_uri)} in {storage.redact(out_uri)}")
    gt = _ground_truth(shards, storage_options)
    detections = store.read_table("detections", [s.name for s in shards])
    dt = _detections_of(detections, gt)
    metrics = coco_metrics(gt, dt, dataset.class_names)
    warning = class_mismatch(_detected_classes(detections), dataset, every_class=False)
    if warning:
        log.warning(warning)
        metrics["warnings"] = [warning]
    metrics["dataset"] = storage.redact(dataset.uri)
    metrics["outputs"] = storage.redact(store.uri)
    if write:
        storage.write_json(storage.join(store.uri, "metrics.json"), metrics, storage_options)
        storage.write_bytes(storage.join(store.uri, "pr_curve.png"), pr_curve_png(metrics), storage_options)
    return metrics


def _detected_classes(detections: Any) -> dict[int, str]:
    """Label → label name of the classes that occur in a detections table."""
    pairs = detections.select(["label", "label_name"]).group_by(["label", "label_name"]).aggregate([])
    return dict(zip(pairs.column("label").to_pylist(), pairs.column("label_name").to_pylist()))


def _ground_truth(shards: Sequence[Any], storage_options: Any) -> list[ImageGT]:
    """The ground truth of the images of ``shards`` (read without the image bytes)."""
    from .dataset import gt_targets, read_shard

    gt = []
    for shard in shards:
        columns = ["image_id", "width", "height", "gt_boxes", "gt_labels", "gt_iscrowd"]
        table = read_shard(shard.uri, columns, storage_options)
        for image_id, width, height, (boxes, labels, crowd) in zip(
            table.column("image_id").to_pylist(),
            table.column("width").to_pylist(),
            table.column("height").to_pylist(),
            gt_targets(table),
        ):
            gt.append(ImageGT(image_id, width or 0, height or 0, boxes, labels, crowd))
    return gt


def _detections_of(detections: Any, gt: list[ImageGT]) -> list[ImageDT]:
    """The rows of a detections table grouped per ground-truth image (images without any: empty)."""
    by_image: dict[str, list[int]] = {}
    for row, image_id in enumerate(detections.column("image_id").to_pylist()):
        by_image.setdefault(image_id, []).append(row)
    boxes = (
        np.stack([detections.column(c).to_numpy() for c in ("x1", "y1", "x2", "y2")], axis=1)
        if detections.num_rows
        else np.zeros((0, 4), dtype=np.float32)
    )
    scores = detections.column("score").to_numpy()
    labels = detections.column("label").to_numpy()
    rows = [by_image.get(item.image_id, []) for item in gt]
    return [ImageDT(item.image_id, boxes[r], scores[r], labels[r]) for item, r in zip(gt, rows)]


def pr_curve_png(metrics: dict) -> bytes:
    """Precision-recall curves at IoU 0.5 per class, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5), dpi=100)
    recall = metrics["pr_curves"]["recall"]
    ap50 = {row["name"]: row["AP50"] for row in metrics["per_class"]}
    ranked = sorted(metrics["pr_curves"]["precision"].items(), key=lambda kv: -ap50.get(kv[0], 0))
    for name, precision in ranked[:12]:
        axis.plot(recall, precision, label=f"{name} (AP50 {ap50.get(name, 0):.2f})")
    axis.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"Precision-recall at IoU 0.5 — mAP@0.5 {metrics['AP50']:.3f}",
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower left")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def format_metrics(metrics: dict) -> str:
    """The summary numbers and the per-class table as text."""
    lines = [
        "  ".join(f"{name} {metrics[name]:.3f}" for name in SUMMARY_NAMES[:6]),
        "  ".join(f"{name} {metrics[name]:.3f}" for name in SUMMARY_NAMES[6:]),
        "",
        f"{'class':<20} {'AP':>6} {'AP50':>6}",
    ]
    for row in sorted(metrics["per_class"], key=lambda r: -r["AP"]):
        lines.append(f"{row['name']:<20} {row['AP']:>6.3f} {row['AP50']:>6.3f}")
    return "\n".join(lines)


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def _empty_metrics(categories: list[dict], num_images: int, num_annotations: int) -> dict:
    return {
        **{name: 0.0 for name in SUMMARY_NAMES},
        "per_class": [{"label": c["id"], "name": c["name"], "AP": 0.0, "AP50": 0.0} for c in categories],
        "pr_curves": {
            "recall": [i / 100 for i in range(101)],
            "precision": {c["name"]: [0.0] * 101 for c in categories},
        },
        "num_images": num_images,
        "num_gt_boxes": num_annotations,
        "num_detections": 0,
    }
