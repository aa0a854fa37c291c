"""The README's tour and its S3 section, run as written (tests/readme.py says how) from a copy of the
repository's layout: a working folder with ``../shared/data/coco/val2017_subset`` beside it (six of
the real COCO photos and their annotations), the session's Prefect server and Ray cluster, the
session's S3 server standing in for ``make s3-server`` and reached through the block's ``-S``
options only. The Ray job block runs in tests/test_ray_job.py, the Prefect block in
tests/test_flows.py; ``make test`` is what CI runs, and ``make demo`` is the demo (not run here: it
trains for minutes)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.readme import run_block

REPO = Path(__file__).resolve().parent.parent
COCO = REPO.parent / "shared" / "data" / "coco" / "val2017_subset"
PHOTOS = 6

pytestmark = pytest.mark.skipif(not COCO.exists(), reason="needs ../shared/data (the COCO photos)")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """``root/repo`` (the working folder) and ``root/shared/data/coco/val2017_subset`` with six
    photos and the annotations of those six."""
    root = tmp_path_factory.mktemp("readme")
    subset = root / "shared" / "data" / "coco" / "val2017_subset"
    (subset / "images").mkdir(parents=True)
    (subset / "annotations").mkdir()
    annotations = json.loads((COCO / "annotations" / "instances_val2017_subset.json").read_text())
    images = sorted(annotations["images"], key=lambda image: image["id"])[:PHOTOS]
    kept = {image["id"] for image in images}
    annotations["images"] = images
    annotations["annotations"] = [a for a in annotations["annotations"] if a["image_id"] in kept]
    (subset / "annotations" / "instances_val2017_subset.json").write_text(json.dumps(annotations))
    for image in images:
        (subset / "images" / image["file_name"]).symlink_to(COCO / "images" / image["file_name"])
    (root / "repo").mkdir()
    return root / "repo"


def _env(ray_address: str, *, aws: bool) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_ADDRESS": ray_address}
    return env if aws else {key: value for key, value in env.items() if not key.startswith("AWS_")}


def test_the_tour(workspace, ray_local, prefect_server) -> None:
    result = run_block(
        "tour",
        cwd=workspace,
        env=_env(ray_local, aws=False),
        replace={"--images 2000 --image-size 128": "--images 24 --image-size 64", "--steps 450": "--steps 2"}
        | {"--steps 600": "--steps 3"},
        timeout=900,
    )
    assert "steps       3 " in result.stdout and "images      24 (0 errors) in 1 shards" in result.stdout
    assert (workspace / "shapes.png").stat().st_size > 0 and (workspace / "out/shapes/metrics.json").exists()
    assert f"images      {PHOTOS} in 1 shards" in result.stdout  # ingest coco and ingest images


def test_the_s3_section(workspace, s3_server, ray_local, prefect_server) -> None:
    if not s3_server.filesystem().exists("detectflow"):
        s3_server.filesystem().mkdir("detectflow")
    result = run_block(
        "s3",
        cwd=workspace,
        env=_env(ray_local, aws=False),
        replace={"http://127.0.0.1:8333": s3_server.endpoint_url},
        timeout=600,
    )
    assert f"images      {PHOTOS} (0 errors) in 1 shards" in result.stdout
    print(result.stdout)
