"""Session-scoped real servers shared by the tests: a SeaweedFS S3 server on loopback."""

from __future__ import annotations

import uuid

import pytest

from pipeline.seaweed import SeaweedS3, restore_env


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS). Its endpoint and credentials are put in the environment so that
    plain ``s3://`` URIs work everywhere, including in processes started later by the tests."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    previous = server.apply_env()
    try:
        yield server
    finally:
        server.stop()
        restore_env(previous)


@pytest.fixture(params=["file", "memory", "s3"])
def storage_root(request, tmp_path) -> str:
    """A fresh, empty root URI on each kind of storage."""
    if request.param == "file":
        return f"file://{tmp_path}/root"
    if request.param == "memory":
        return f"memory://detectflow-test-{uuid.uuid4().hex}"
    return request.getfixturevalue("s3_server").new_bucket("root")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray cluster, started after the S3 environment is set (its workers inherit it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
