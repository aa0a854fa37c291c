"""`detectflow infer` submitted as a Ray job to a head started with token authentication."""

from __future__ import annotations

import os
import shutil
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
from tests.readme import run_block
from tests.seaweed import SECRET_KEY, free_port

SECRET_VARIABLE = "S3_SECRET"  # the name the README uses
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


# the CLI runs through Prefect flows: they report to the session's Prefect server
pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture(scope="module")
def head(s3_server):
    """A Ray head (`ray start --head --block`) with token auth, its own HOME and temp dir, and no
    storage settings in its environment (its workers get them from the driver only); stopped by
    killing its process group so that the session's other Ray cluster is left alone."""
    home = Path(tempfile.mkdtemp(prefix="rayhome-"))
    temp_dir = tempfile.mkdtemp(prefix="rayj-", dir="/tmp")
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    head_env = {name: value for name, value in env.items() if not name.startswith("AWS_")}
    # The head's machine holds the S3 secret in a variable of its own (as a cluster's nodes hold their
    # credentials); a job names it as `-S secret=env:NAME` and never carries the value.
    head_env[SECRET_VARIABLE] = SECRET_KEY
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    dashboard, gcs_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            RAY,
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
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
        env=head_env,
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
        yield {"url": url, "gcs_address": f"127.0.0.1:{gcs_port}", "env": env, "head_env": head_env}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)  # `ray start --block` outlasts SIGTERM (measured: > 30 s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _dataset_and_model(s3_server, tmp_path: Path) -> tuple[str, str, str]:
    bucket = s3_server.new_bucket("rayjob")
    dataset = ingest_synthetic(bucket + "/data", num_images=12, image_size=64, shard_size=4)
    torch.manual_seed(0)
    model = build_detector(
        "tiny", len(CATEGORIES) + 1, class_names=["__background__", *CATEGORIES], box_score_thresh=0.0
    )
    save_checkpoint(model, tmp_path / "model.pt")
    storage.write_bytes(bucket + "/model.pt", (tmp_path / "model.pt").read_bytes())
    return dataset.uri, bucket + "/out", bucket + "/model.pt"


def _assert_finished(out_uri: str) -> None:
    store = OutputStore(out_uri)
    assert store.committed_names() == {"shard-00000", "shard-00001", "shard-00002"}
    assert store.read_table("images").num_rows == 12
    assert store.read_manifest()["state"] == "finished"


def test_infer_as_a_ray_job_with_token_auth(head, s3_server, tmp_path) -> None:
    """The job's driver runs on the head, whose environment has no S3 settings: the
    ``--storage-option`` values must reach the actors too."""
    data_uri, out_uri, model_uri = _dataset_and_model(s3_server, tmp_path)
    options = s3_server.storage_options()
    entrypoint = [
        str(BIN / "detectflow"),
        "infer",
        data_uri,
        out_uri,
        "--model",
        model_uri,
        "--workers",
        "1",
        "--storage-option",
        f"key={options['key']}",
        "--storage-option",
        f"secret=env:{SECRET_VARIABLE}",
        "--storage-option",
        f"client_kwargs.endpoint_url={options['client_kwargs']['endpoint_url']}",
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

    # The README's block, as written, from a machine whose HOME holds no token: the token is the
    # head's, copied. The head's job agent can come up after its dashboard answers: retry while it
    # says so.
    submitter = tmp_path / "submitter"
    submitter.mkdir()
    replace = {
        "scp head:.ray/auth_token head_auth_token": f"cp {head['env']['HOME']}/.ray/auth_token head_auth_token",
        "http://127.0.0.1:8265": head["url"],
        "s3://detectflow/datasets/photos": data_uri,
        "s3://detectflow/detections/photos-job": out_uri,
        "s3://detectflow/models/shapes.pt": model_uri,
        "http://127.0.0.1:8333": options["client_kwargs"]["endpoint_url"],
    }
    environment = {key: value for key, value in stranger.items() if key not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    deadline = time.monotonic() + 120
    while True:
        submitted = run_block("ray-job", cwd=submitter, env=environment, replace=replace, timeout=600, check=False)
        if "No available agent" not in submitted.stderr + submitted.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout.lower()
    _assert_finished(out_uri)
    # What Ray recorded of the job (its entrypoint, runtime_env, logs) names the secret, never holds it.
    recorded = subprocess.run(
        [RAY, "job", "list", "--address", head["url"]],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert recorded.returncode == 0, recorded.stderr[-2000:]
    assert f"env:{SECRET_VARIABLE}" in recorded.stdout and SECRET_KEY not in recorded.stdout
    assert SECRET_KEY not in submitted.stdout + submitted.stderr  # the job's logs, as streamed back
    assert SECRET_KEY not in storage.read_bytes(out_uri + "/_manifest.json").decode()
    # The job ran the inference flow: its run is on the session's Prefect server, completed.
    assert _completed_inference_flow_runs(out_uri) == 1


def _completed_inference_flow_runs(out_uri: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["inference"])))
    return sum(1 for run in runs if run.parameters["spec"]["out_uri"] == out_uri and run.state.is_completed())


def test_driver_environment_reaches_the_actors_of_a_remote_cluster(head, s3_server, tmp_path) -> None:
    """A driver outside the cluster with its S3 settings in ``AWS_*`` variables only: the head's
    workers have none, so the actors can reach the store only with the driver's."""
    data_uri, out_uri, model_uri = _dataset_and_model(s3_server, tmp_path)
    assert any(name.startswith("AWS_") for name in head["env"])
    assert not any(name.startswith("AWS_") for name in head["head_env"])
    result = subprocess.run(
        [
            str(BIN / "detectflow"),
            "infer",
            data_uri,
            out_uri,
            "--model",
            model_uri,
            "--workers",
            "1",
            "--ray-address",
            head["gcs_address"],
        ],
        env=head["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_finished(out_uri)
