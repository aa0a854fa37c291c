"""SQL over committed outputs (DuckDB), evaluation from committed outputs, and the PNG view."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageColor

from pipeline import storage
from pipeline.dataset import gt_targets, read_shard
from pipeline.decode import decode_image
from pipeline.evaluate import evaluate, format_metrics
from pipeline.ingest import ingest_synthetic
from pipeline.outputs import DETECTIONS_SCHEMA, IMAGES_SCHEMA, OutputStore
from pipeline.query import query
from pipeline.show import PALETTE, SHEET_GAP, render, render_sheet
from tests.test_outputs import output_tables


def test_query_on_empty_outputs_has_the_schemas(tmp_path) -> None:
    out = str(tmp_path / "empty")
    assert query(out, "SELECT count(*) AS n FROM detections").to_pylist() == [{"n": 0}]
    detections = query(out, "SELECT * FROM detections")
    assert detections.num_rows == 0 and detections.schema.names == DETECTIONS_SCHEMA.names
    assert detections.schema.field("score").type == pa.float32()
    assert query(out, "SELECT * FROM images").schema.names == IMAGES_SCHEMA.names


def test_bad_sql_is_a_value_error(tmp_path) -> None:
    out = str(tmp_path / "out")
    OutputStore(out).write_shard("shard-00000", *output_tables("shard-00000", ["a"]), {"run_id": "r"})
    for sql in ("SELECT nope FROM detections", "SELEC 1", "SELECT * FROM boxes"):
        with pytest.raises(ValueError, match="query failed"):
            query(out, sql)


def test_query_filters_and_parameters_over_s3(s3_server) -> None:
    out = s3_server.new_bucket("out") + "/run"
    store = OutputStore(out)
    for index in range(3):
        shard = f"shard-{index:05d}"
        store.write_shard(shard, *output_tables(shard, [f"{shard}/img{i}" for i in range(4)]), {"run_id": "r"})
    per_shard = query(out, "SELECT shard, count(*) AS n FROM detections GROUP BY shard ORDER BY shard").to_pylist()
    assert per_shard == [{"shard": f"shard-{i:05d}", "n": 8} for i in range(3)]
    hit = query(
        out,
        "SELECT image_id, max(score) AS best FROM detections WHERE image_id = ? GROUP BY image_id",
        parameters=["shard-00001/img2"],
    ).to_pylist()
    assert hit == [{"image_id": "shard-00001/img2", "best": pytest.approx(0.6)}]
    joined = query(
        out, "SELECT count(*) AS n FROM images i JOIN detections d USING (image_id) WHERE i.status = 'ok'"
    ).to_pylist()
    assert joined == [{"n": 24}]


def _ground_truth_outputs(dataset, out: str, shard_index: int = 0) -> list[dict]:
    """Commit the ground truth of one shard as its detections (score 0.9); returns the image rows."""
    shard = dataset.shards[shard_index]
    table = read_shard(shard.uri, ["image_id", "width", "height", "gt_boxes", "gt_labels", "gt_iscrowd"])
    image_rows, detection_rows = [], []
    for image_id, (boxes, labels, _) in zip(table.column("image_id").to_pylist(), gt_targets(table)):
        image_rows.append(
            {
                "image_id": image_id,
                "shard": shard.name,
                "width": 96,
                "height": 96,
                "status": "ok",
                "error": None,
                "num_detections": len(labels),
                "run_id": "r",
                "model_id": "m",
            }
        )
        for box, label in zip(boxes, labels):
            detection_rows.append(
                {
                    "image_id": image_id,
                    "shard": shard.name,
                    "label": int(label),
                    "label_name": dataset.class_names[label],
                    "score": 0.9,
                    "x1": box[0],
                    "y1": box[1],
                    "x2": box[2],
                    "y2": box[3],
                    "run_id": "r",
                    "model_id": "m",
                }
            )
    OutputStore(out).write_shard(
        shard.name,
        pa.Table.from_pylist(image_rows, IMAGES_SCHEMA),
        pa.Table.from_pylist(detection_rows, DETECTIONS_SCHEMA),
        {"run_id": "r"},
    )
    return image_rows


def test_evaluate_uses_committed_outputs_only(tmp_path) -> None:
    dataset = ingest_synthetic(str(tmp_path / "ds"), num_images=12, image_size=96, shard_size=6)
    out = str(tmp_path / "out")
    # Ground truth as detections for shard 0 only: shard 1 stays uncommitted and out of the metrics.
    _ground_truth_outputs(dataset, out)
    metrics = evaluate(dataset.uri, out)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["num_images"] == 6
    assert storage.read_json(out + "/metrics.json")["AP50"] == pytest.approx(1.0)
    assert storage.read_bytes(out + "/pr_curve.png").startswith(b"\x89PNG")
    assert "AP50" in format_metrics(metrics)


def test_render_draws_the_committed_boxes(tmp_path) -> None:
    dataset = ingest_synthetic(str(tmp_path / "ds"), num_images=6, image_size=96, shard_size=6)
    out = str(tmp_path / "out")
    image_rows = _ground_truth_outputs(dataset, out)
    OutputStore(out).write_manifest({"data_uri": dataset.uri})
    row = max(image_rows, key=lambda r: r["num_detections"])
    image_id = row["image_id"]

    drawn = render(out, image_id, "memory://detectflow-test-show/view.png")  # dataset from the manifest
    try:
        assert drawn == {
            "image_id": image_id,
            "shard": "shard-00000",
            "num_drawn": row["num_detections"],
            "path": "memory://detectflow-test-show/view.png",
            "zoom": 6,  # 96 px → 576, the smallest whole factor reaching 512
        }
        with Image.open(io.BytesIO(storage.read_bytes("memory://detectflow-test-show/view.png"))) as png:
            picture = np.asarray(png.convert("RGB"))
    finally:
        storage.delete("memory://detectflow-test-show")
    original = read_shard(dataset.shards[0].uri, ["image_id", "image"]).to_pylist()
    source = next(r["image"] for r in original if r["image_id"] == image_id)
    plain = decode_image(source, image_id).image.permute(1, 2, 0).numpy()
    plain = plain.repeat(6, axis=0).repeat(6, axis=1)  # enlarged with sharp pixels
    assert picture.shape[1:] == (576, 3) and plain.shape == (576, 576, 3)
    picture, caption = picture[:576], picture[576:]  # the image, then a white band with its id
    assert 12 < caption.shape[0] < 40 and (caption < 128).any(), "the image id is written below the image"
    # 2-px outlines and 14-px labels on a 576-px picture (a blank render differs nowhere, below)
    assert (picture != plain).any(axis=2).mean() > 0.01, "boxes and labels were drawn"
    boxes, labels, _ = gt_targets(
        read_shard(dataset.shards[0].uri, ["image_id", "gt_boxes", "gt_labels", "gt_iscrowd"])
    )[[r["image_id"] for r in original].index(image_id)]
    colours = {tuple(ImageColor.getrgb(PALETTE[int(label) % len(PALETTE)])) for label in labels}
    # The right edge of each box is drawn in its class colour at the enlarged scale (labels sit
    # above/left of the box).
    x2, y1, y2 = (int(v * 6) for v in (boxes[0][2], boxes[0][1], boxes[0][3]))
    edge = {tuple(int(v) for v in picture[y, min(x2 - 1, 575)]) for y in range(max(y1, 0), min(y2, 576))}
    assert edge & colours

    blank = render(out, image_id, str(tmp_path / "none.png"), dataset_uri=dataset.uri, score_threshold=0.95)
    assert blank["num_drawn"] == 0
    with Image.open(tmp_path / "none.png") as png:
        assert np.array_equal(np.asarray(png.convert("RGB"))[:576], plain)


def test_render_sheet_tiles_the_single_renders(tmp_path) -> None:
    dataset = ingest_synthetic(str(tmp_path / "ds"), num_images=6, image_size=96, shard_size=3)
    out = str(tmp_path / "out")
    _ground_truth_outputs(dataset, out)  # shard 0 only
    image_ids = [f"synth-0-{i:07d}" for i in (2, 0, 1)]
    drawn = render_sheet(out, image_ids, str(tmp_path / "sheet.png"), dataset_uri=dataset.uri, columns=2)
    assert [d["image_id"] for d in drawn["images"]] == image_ids
    with Image.open(tmp_path / "sheet.png") as png:
        sheet = np.asarray(png.convert("RGB"))
    gap, cell = SHEET_GAP, 576
    band = sheet.shape[0] - 2 * (cell + gap) - gap  # two caption bands, one per row
    assert sheet.shape[1:] == (2 * cell + 3 * gap, 3) and band > 0 and band % 2 == 0
    cell_h = cell + band // 2
    for index, image_id in enumerate(image_ids):  # cells in reading order, each the single render
        render(out, image_id, str(tmp_path / "one.png"), dataset_uri=dataset.uri)
        with Image.open(tmp_path / "one.png") as png:
            single = np.asarray(png.convert("RGB"))
        top, left = gap + (index // 2) * (cell_h + gap), gap + (index % 2) * (cell + gap)
        assert np.array_equal(sheet[top : top + cell_h, left : left + cell], single), image_id
    assert (sheet[-cell_h - gap : -gap, -cell - gap : -gap] == 255).all()  # the fourth cell is empty
    with pytest.raises(ValueError, match="image 'synth-0-0000004' is not among the committed outputs"):
        render_sheet(out, [image_ids[0], "synth-0-0000004"], str(tmp_path / "no.png"), dataset_uri=dataset.uri)
    assert not (tmp_path / "no.png").exists()


def test_render_errors_name_the_item(tmp_path) -> None:
    dataset = ingest_synthetic(str(tmp_path / "ds"), num_images=3, image_size=32, shard_size=3)
    out = str(tmp_path / "out")
    _ground_truth_outputs(dataset, out)
    with pytest.raises(ValueError, match="has no manifest naming its dataset"):
        render(out, "synth-0-0000000", str(tmp_path / "x.png"))
    for image_id in ("no-such-image", "it's-quoted"):
        with pytest.raises(ValueError, match=re.escape(f"image {image_id!r} is not among the committed outputs")):
            render(out, image_id, str(tmp_path / "x.png"), dataset_uri=dataset.uri)
    assert not (tmp_path / "x.png").exists()
