"""What a user sees when a command fails for an expected reason: a few lines at most, the last one
naming the item and the cause, exit code 1 — no orchestration log, no traceback (those come with
``--verbose``). The real console script, the session's Prefect server, the real S3 server reached
only through ``-S`` options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from detector import build_detector, save_checkpoint
from pipeline.ingest import ingest_synthetic
from tests.seaweed import ACCESS_KEY, SECRET_KEY

DETECTFLOW = str(Path(sys.executable).parent / "detectflow")
MAX_LINES = 6


def _options(endpoint: str, secret: str = SECRET_KEY) -> list[str]:
    return ["-S", f"key={ACCESS_KEY}", "-S", f"secret={secret}", "-S", f"client_kwargs.endpoint_url={endpoint}"]


def _environment() -> dict[str, str]:
    """The test session's environment without its AWS settings: storage comes from -S alone."""
    return {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}


@pytest.fixture(scope="module")
def cases(tmp_path_factory, s3_server, prefect_server) -> dict[str, tuple[list[str], str]]:
    folder = tmp_path_factory.mktemp("errors")
    dataset = ingest_synthetic(f"file://{folder}/data", num_images=2, image_size=32, shard_size=2)
    save_checkpoint(build_detector("tiny", 4), folder / "model.pt")
    bucket = s3_server.new_bucket("errors")
    s3 = _options(s3_server.endpoint_url)
    return {
        "missing dataset": (
            ["infer", str(folder / "nodata"), str(folder / "out"), "--model", str(folder / "model.pt"), "--local"],
            f"error: no dataset at file://{folder}/nodata (missing dataset.json; create one with `detectflow ingest` "
            "or `detectflow synth`)",
        ),
        "missing model": (
            ["infer", dataset.uri, str(folder / "out"), "--model", str(folder / "nomodel.pt"), "--local"],
            f"error: reading file://{folder}/nomodel.pt failed: not found",
        ),
        "missing bucket": (
            ["synth", "s3://no-such-bucket-here/data", "--images", "2", *s3],
            "error: opening bucket of s3://no-such-bucket-here/data/_lease.json failed: no such bucket "
            f"'no-such-bucket-here' (endpoint {s3_server.endpoint_url})",
        ),
        "missing output bucket, before any input is read": (
            ["infer", "s3://no-input-bucket/data", "s3://no-output-bucket/out", "--model", "x.pt", "--local", *s3],
            "error: opening bucket of s3://no-output-bucket/out failed: no such bucket 'no-output-bucket' "
            f"(endpoint {s3_server.endpoint_url})",
        ),
        "access denied": (
            ["synth", f"{bucket}/data", "--images", "2", *_options(s3_server.endpoint_url, secret="wrong")],
            f"error: opening bucket of {bucket}/data/_lease.json failed: access denied to bucket "
            f"'{bucket[5:]}' (endpoint {s3_server.endpoint_url}): PermissionError: Forbidden",
        ),
        "unreachable endpoint": (
            ["synth", f"{bucket}/data", "--images", "2", *_options("http://127.0.0.1:9")],
            f"error: opening bucket of {bucket}/data/_lease.json failed after 3 attempts: could not connect "
            "(endpoint http://127.0.0.1:9): no request to it has succeeded; is the endpoint URL right and the "
            "server running?",
        ),
    }


def test_expected_failures_are_a_few_lines_naming_item_and_cause(cases) -> None:
    running = {
        name: subprocess.Popen(
            [DETECTFLOW, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_environment()
        )
        for name, (args, _) in cases.items()
    }
    for name, process in running.items():
        output, _ = process.communicate(timeout=300)
        lines = output.strip().splitlines()
        assert process.returncode == 1, f"{name}: {output}"
        assert len(lines) <= MAX_LINES, f"{name}: {len(lines)} lines:\n{output}"
        assert lines[-1] == cases[name][1], name
        assert "Traceback" not in output and "| INFO" not in output, name


def test_verbose_shows_the_traceback(cases) -> None:
    args, last = cases["missing model"]
    result = subprocess.run([DETECTFLOW, "--verbose", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1] == last
