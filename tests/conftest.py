"""Session-scoped real servers shared by the tests: a SeaweedFS S3 server and a Prefect server on
loopback, a local Ray cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipeline import storage
from tests.seaweed import SeaweedS3, restore_env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The Prefect API of the test session, set before anything imports prefect (its settings are read
# once per process) and inherited by every process the tests start: CLI subprocesses, Ray workers
# and job drivers, Prefect workers. The server itself starts with the ``prefect_server`` fixture; a
# flow run without it fails to connect rather than silently starting an ephemeral server.
_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="detectflow-test-prefect-"))
_PREFECT_PORT = _free_port()
os.environ.update(
    {
        "PREFECT_HOME": str(_PREFECT_HOME),
        "PREFECT_API_URL": f"http://127.0.0.1:{_PREFECT_PORT}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
        "DETECTFLOW_TASK_RETRY_DELAYS_S": "2,4,8",  # task retries after transient failures
    }
)

# Importing prefect.main configures its console log handler with the sys.stderr of that moment. Do it
# now, on the session's stream: the CLI imports prefect lazily, and a first import inside a
# CliRunner invocation would bind the handler to that invocation's stream, closed when it returns,
# and every later flow-run log line would fail.
import prefect.main  # noqa: E402,F401  (the import that runs prefect.logging setup_logging)


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect server (``prefect server start``, SQLite under a temp PREFECT_HOME) on
    loopback; yields its API URL (already in ``PREFECT_API_URL``)."""
    api = os.environ["PREFECT_API_URL"]
    log = open(_PREFECT_HOME / "server.log", "wb")  # noqa: SIM115 - open for the session
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(_PREFECT_PORT),
            "--no-ui",
            "--analytics-off",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"prefect server did not start: {(_PREFECT_HOME / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield api
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS on loopback, free ports), started once per session.

    ``.endpoint_url``; ``.stop()`` / ``.start()`` (same ports and data: the fault tests take it down
    mid-run); ``.new_bucket(prefix="t") -> "s3://t-…"``; ``.storage_options(read_only=False)``.
    Credentials are checked: the full-access key pair is put in the environment
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) for the
    session, so that plain ``s3://`` URIs work everywhere, in processes started later by the tests
    (Ray workers, CLI subprocesses) too; the previous environment is restored at the end.
    """
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    previous = server.apply_env()
    try:
        yield server
    finally:
        server.stop()
        restore_env(previous)


@pytest.fixture(params=["file", "memory", "s3"])
def storage_root(request, tmp_path):
    """A fresh, empty root URI on each kind of storage: a folder under ``tmp_path``, a unique
    ``memory://`` path (removed afterwards: the memory store is process-wide), a new S3 bucket."""
    if request.param == "file":
        yield f"file://{tmp_path}/root"
    elif request.param == "memory":
        root = f"memory://detectflow-test-{uuid.uuid4().hex}"
        yield root
        storage.delete(root)
    else:
        yield request.getfixturevalue("s3_server").new_bucket("root")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray cluster, started after the S3 environment is set (its workers inherit it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
