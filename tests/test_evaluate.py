"""COCO evaluation against pycocotools run directly on COCO JSON files."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipeline.evaluate import ImageDT, ImageGT, coco_metrics

COCO_JSON = (
    Path(__file__).resolve().parents[2] / "shared/data/coco/val2017_subset/annotations/instances_val2017_subset.json"
)
pytestmark = pytest.mark.skipif(not COCO_JSON.exists(), reason="shared COCO data not present")


def _inputs(shift: float, seed: int = 0):
    """Our inputs and the equivalent COCO results list, from the real annotations: each non-crowd box
    shifted by ``shift`` of its size (random direction), with random scores; a few boxes dropped."""
    coco = json.loads(COCO_JSON.read_text())
    rng = np.random.default_rng(seed)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
    names = ["__background__"] + [c["name"] for c in categories]
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    gt, dt, results = [], [], []
    for image in coco["images"]:
        anns = by_image.get(image["id"], [])
        boxes = np.array(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            dtype=np.float64,
        ).reshape(-1, 4)
        labels = np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64)
        crowd = np.array([bool(a["iscrowd"]) for a in anns], dtype=bool)
        gt.append(ImageGT(str(image["id"]), image["width"], image["height"], boxes, labels, crowd))
        keep = ~crowd & (rng.random(len(anns)) > 0.1)
        size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
        moved = boxes + shift * size * rng.uniform(-1, 1, size=(len(anns), 1))
        scores = rng.random(len(anns))
        dt.append(ImageDT(str(image["id"]), moved[keep], scores[keep], labels[keep]))
        for box, score, ann in zip(moved[keep], scores[keep], np.array(anns, dtype=object)[keep]):
            results.append(
                {
                    "image_id": image["id"],
                    "category_id": ann["category_id"],
                    "score": float(score),
                    "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                }
            )
    return gt, dt, names, results


def _pycocotools_stats(results: list[dict]) -> list[float]:
    """pycocotools on the annotation file itself — with each ``area`` set to its box's area, as
    datasets keep boxes only (no segmentation), so small/medium/large are judged by box area."""
    coco = json.loads(COCO_JSON.read_text())
    for ann in coco["annotations"]:
        ann["area"] = ann["bbox"][2] * ann["bbox"][3]
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO()
        reference.dataset = coco
        reference.createIndex()
        evaluator = COCOeval(reference, reference.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def test_ground_truth_as_detections_scores_ap_1() -> None:
    gt, dt, names, _ = _inputs(shift=0.0)
    perfect = [ImageDT(g.image_id, g.boxes[~g.iscrowd], np.ones((~g.iscrowd).sum()), g.labels[~g.iscrowd]) for g in gt]
    metrics = coco_metrics(gt, perfect, names)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


@pytest.mark.parametrize("shift", [0.05, 0.15, 0.3])
def test_shifted_boxes_match_pycocotools(shift: float) -> None:
    gt, dt, names, results = _inputs(shift)
    ours = coco_metrics(gt, dt, names)
    reference = _pycocotools_stats(results)
    assert 0.0 < ours["AP"] < 1.0
    names_in_order = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    for name, value in zip(names_in_order, reference):
        assert ours[name] == pytest.approx(value, abs=1e-9), name


def test_no_detections_scores_zero_and_unknown_images_are_refused() -> None:
    gt, _, names, _ = _inputs(shift=0.0)
    assert coco_metrics(gt, [], names)["AP"] == 0.0
    with pytest.raises(ValueError, match="without ground truth"):
        coco_metrics(gt[:1], [ImageDT("nope", np.zeros((0, 4)), np.zeros(0), np.zeros(0))], names)
