"""`detectflow infer` submitted as a Ray job to a head started with token authentication."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from detector import build_detector, save_checkpoint
from detector.synthetic import CATEGORIES
from pipeline import storage
from pipeline.ingest import ingest_synthetic
from pipeline.outputs import OutputStore
from pipeline.seaweed import free_port

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


@pytest.fixture(scope="module")
def head(s3_server):
    """A Ray head (`ray start --head --block`) with token auth, its own HOME and temp dir; stopped by
    killing its process group so that the session's other Ray cluster is left alone."""
    home = Path(tempfile.mkdtemp(prefix="rayhome-"))
    temp_dir = tempfile.mkdtemp(prefix="rayj-", dir="/tmp")
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    dashboard = free_port()
    process = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            # Every port of its own: the session's other Ray cluster holds the default agent ports.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=true",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        probe = subprocess.run([RAY, "job", "list", "--address", url], env=env, capture_output=True, timeout=60)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        raise RuntimeError("the Ray head did not come up")
    try:
        yield {"url": url, "env": env, "home": home}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def test_infer_as_a_ray_job_with_token_auth(head, s3_server, tmp_path) -> None:
    bucket = s3_server.new_bucket("rayjob")
    dataset = ingest_synthetic(bucket + "/data", num_images=12, image_size=64, shard_size=4)
    torch.manual_seed(0)
    model = build_detector(
        "tiny", len(CATEGORIES) + 1, class_names=["__background__", *CATEGORIES], box_score_thresh=0.0
    )
    save_checkpoint(model, tmp_path / "model.pt")
    storage.write_bytes(bucket + "/model.pt", (tmp_path / "model.pt").read_bytes())
    entrypoint = [
        str(BIN / "detectflow"),
        "infer",
        dataset.uri,
        bucket + "/out",
        "--model",
        bucket + "/model.pt",
        "--workers",
        "1",
    ]

    # Without the token the submission is refused.
    stranger = {**head["env"], "HOME": str(tmp_path / "no-token-home")}
    refused = subprocess.run(
        [RAY, "job", "submit", "--address", head["url"], "--no-wait", "--", *entrypoint],
        env=stranger,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert any(word in (refused.stdout + refused.stderr).lower() for word in ("token", "auth", "401", "unauthorized"))

    # The head's job agent can come up after its dashboard answers: retry while it says so.
    deadline = time.monotonic() + 120
    while True:
        submitted = subprocess.run(
            [RAY, "job", "submit", "--address", head["url"], "--", *entrypoint],
            env=head["env"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if "No available agent" not in submitted.stderr + submitted.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout.lower()
    store = OutputStore(bucket + "/out")
    assert store.committed_names() == {"shard-00000", "shard-00001", "shard-00002"}
    assert store.read_table("images").num_rows == 12
    assert store.read_manifest()["state"] == "finished"
