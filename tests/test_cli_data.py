"""The data commands of the CLI, through Typer's runner and once through the console script."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app, ingest_coco_command, ingest_images_command, synth_command
from pipeline import storage
from pipeline.dataset import DEFAULT_SHARD_SIZE
from pipeline.outputs import OutputStore
from tests.corpus import write_bad_input_corpus
from tests.seaweed import READER_ACCESS_KEY, READER_SECRET_KEY
from tests.test_outputs import output_tables

# the CLI runs through Prefect flows: they report to the session's Prefect server
pytestmark = pytest.mark.usefixtures("prefect_server")


runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ingest", "synth", "query", "show", "evaluate"):
        assert command in result.output
    for sub in (["ingest", "coco", "--help"], ["ingest", "images", "--help"], ["query", "--help"]):
        assert runner.invoke(app, sub).exit_code == 0


def test_synth_ingest_query_flow(tmp_path) -> None:
    data = tmp_path / "synth"
    result = runner.invoke(app, ["synth", str(data), "--images", "9", "--image-size", "64", "--shard-size", "4"])
    assert result.exit_code == 0, result.output
    assert "9 in 3 shards" in result.output
    assert json.loads((data / "dataset.json").read_text())["num_images"] == 9

    corpus = tmp_path / "corpus"
    write_bad_input_corpus(corpus)
    result = runner.invoke(app, ["ingest", "images", str(corpus), str(tmp_path / "imgs")])
    assert result.exit_code == 0, result.output
    assert "undecodable" in result.output and "zero.jpg" in result.output

    result = runner.invoke(
        app, ["query", str(tmp_path / "out"), "SELECT count(*) AS n FROM images", "--format", "json"]
    )
    assert result.exit_code == 0 and json.loads(result.output) == [{"n": 0}]


def test_bad_arguments_are_one_clear_line(tmp_path) -> None:
    result = runner.invoke(app, ["query", str(tmp_path), "SELECT nope FROM images"])
    assert result.exit_code == 1 and "error: query failed" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "none"), str(tmp_path)])
    assert result.exit_code == 1 and "no dataset at" in result.output
    result = runner.invoke(app, ["synth", str(tmp_path / "x"), "--images", "0"])
    assert result.exit_code == 2  # Typer's own validation
    result = runner.invoke(app, ["synth", str(tmp_path / "x"), "--images", "1", "--storage-option", "novalue"])
    assert result.exit_code == 2 and "key=value" in result.output


def test_ingest_coco_summary_names_rejections(tmp_path) -> None:
    folder = tmp_path / "images"
    write_bad_input_corpus(folder)
    coco = {
        "images": [
            {"id": 1, "file_name": "good.jpg", "width": 64, "height": 48},
            {"id": 2, "file_name": "gone.jpg", "width": 8, "height": 8},
        ],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]},
            {"id": 11, "image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 4]},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    out = tmp_path / "ds"
    args = ["ingest", "coco", str(out), "--images", str(folder), "--annotations", str(tmp_path / "ann.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "1 in 1 shards" in result.output and "categories  1: thing" in result.output
    assert "image 2 (gone.jpg): missing file" in result.output
    assert "annotation 11 (image 1): unknown category 5" in result.output
    assert str(out) in result.output

    result = runner.invoke(app, ["ingest", "coco", str(out), "--images", str(folder), "--annotations", "nope.json"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "nope.json" in result.output
    assert "Traceback" not in result.output


def test_shard_size_defaults_to_the_pipeline_default() -> None:
    for command in (ingest_coco_command, ingest_images_command, synth_command):
        assert inspect.signature(command).parameters["shard_size"].default == DEFAULT_SHARD_SIZE


def test_show_writes_a_png(tmp_path) -> None:
    data = tmp_path / "synth"
    assert runner.invoke(app, ["synth", str(data), "--images", "2", "--image-size", "64"]).exit_code == 0
    out = str(tmp_path / "out")
    images, detections = output_tables("shard-00000", ["synth-0-0000000", "synth-0-0000001"])
    OutputStore(out).write_shard("shard-00000", images, detections, {"run_id": "r"})
    png = tmp_path / "view.png"
    args = ["show", out, "--image-id", "synth-0-0000001", "--out", str(png), "--dataset", str(data)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "drew 2 detections of synth-0-0000001 (shard shard-00000)" in result.output
    with Image.open(png) as picture:
        assert picture.size == (512, 512 + 28)  # 64 px enlarged 8×, and a 28-px caption band
    sheet = tmp_path / "sheet.png"
    args = ["show", out, "--image-id", "synth-0-0000001", "--image-id", "synth-0-0000000", "--out", str(sheet)]
    result = runner.invoke(app, [*args, "--dataset", str(data), "--columns", "1"])
    assert result.exit_code == 0, result.output
    assert "drew 2 detections of synth-0-0000000" in result.output and f"wrote {sheet}" in result.output
    with Image.open(sheet) as picture:
        assert picture.size == (512 + 2 * 8, 2 * (512 + 28) + 3 * 8)  # one column, two rows
    result = runner.invoke(app, ["show", out, "--image-id", "nope", "--out", str(png), "--dataset", str(data)])
    assert result.exit_code == 1 and "error: image 'nope' is not among the committed outputs" in result.output


def test_storage_options_reach_the_storage_layer(s3_server, tmp_path) -> None:
    """The environment holds full-access keys; a read-only key given with -S must be the one used."""
    bucket = s3_server.new_bucket("cli")
    read_only = ["-S", f"key={READER_ACCESS_KEY}", "-S", f"secret={READER_SECRET_KEY}"]
    result = runner.invoke(app, ["synth", f"{bucket}/ds", "--images", "1", "--image-size", "32", *read_only])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: writing s3://") and "Traceback" not in result.output
    assert "access denied" in result.output
    assert READER_SECRET_KEY not in result.output
    assert not storage.exists(f"{bucket}/ds/dataset.json")
    # nothing of one command stays behind for the next: the environment's full-access keys work again
    result = runner.invoke(app, ["synth", f"{bucket}/ds", "--images", "1", "--image-size", "32"])
    assert result.exit_code == 0, result.output


def test_console_script_runs(tmp_path) -> None:
    script = Path(sys.executable).parent / "detectflow"
    result = subprocess.run(
        [str(script), "synth", str(tmp_path / "d"), "--images", "2", "--image-size", "32"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "2 in 1 shards" in result.stdout


def test_storage_errors_name_the_cause_not_a_missing_dataset(s3_server, monkeypatch) -> None:
    """Wrong credentials, an unreachable endpoint, a wrong bucket: the error says which, with the
    endpoint, and never blames the dataset."""
    bucket = s3_server.new_bucket("cause")
    assert runner.invoke(app, ["synth", f"{bucket}/ds", "--images", "1", "--image-size", "32"]).exit_code == 0
    monkeypatch.setattr(storage, "RETRY_ATTEMPTS", 1)
    endpoint = f"client_kwargs.endpoint_url={s3_server.endpoint_url}"
    cases = {
        "access denied": [f"{bucket}/ds", "-S", "key=detectflow", "-S", "secret=not-the-secret", "-S", endpoint],
        "could not connect": [f"{bucket}/ds", "-S", "client_kwargs.endpoint_url=http://127.0.0.1:9"],
        "no such bucket": [f"s3://detectflow-no-such-bucket-{bucket[-6:]}/ds", "-S", endpoint],
    }
    for cause, (data_uri, *options) in cases.items():
        result = runner.invoke(app, ["infer", data_uri, f"{bucket}/out", "--model", f"{bucket}/m.pt", *options])
        assert result.exit_code == 1, result.output
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("error: ") and cause in last and "no dataset" not in last, (cause, result.output)
        assert "not-the-secret" not in result.output
        if cause == "could not connect":
            assert "(endpoint http://127.0.0.1:9)" in last


def test_ingest_waits_for_a_held_dataset_lease_or_names_the_holder(tmp_path) -> None:
    """Another run holds the dataset: `synth` stops at once naming it, or with --wait-for-lease
    waits for the release and then writes."""
    import threading

    from pipeline.lease import Lease, lease_uri

    data = tmp_path / "ds"
    holder = Lease(lease_uri(str(data)), run_id="other-run", what="a test holding the dataset").acquire()
    args = ["synth", str(data), "--images", "2", "--image-size", "32"]
    try:
        refused = runner.invoke(app, args)
        assert refused.exit_code == 1 and "other-run" in refused.output, refused.output
        assert not (data / "dataset.json").exists()
        threading.Timer(2.0, holder.release).start()
        waited = runner.invoke(app, [*args, "--wait-for-lease", "60"])
    finally:
        holder.release()
    assert waited.exit_code == 0, waited.output
    assert (data / "dataset.json").exists()
