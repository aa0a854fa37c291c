"""The data commands of the CLI, through Typer's runner and once through the console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from tests.corpus import write_bad_input_corpus

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
