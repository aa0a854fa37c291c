"""detectflow on a real Ray cluster of two nodes (a head and a second `ray start --address` node on
loopback), with the S3 server configured only by `-S` storage options: no AWS_* variable anywhere,
in the CLI or on the nodes. Whatever a worker on the other node needs must reach it with the job.

The scenario a user runs — synth → train with 2 workers → infer → evaluate → query — through the
CLI (every command a Prefect flow run on the session's server), then what must not happen: a
local path on two nodes, a secret in any record.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pipeline import storage
from pipeline.ingest import ingest_synthetic
from pipeline.outputs import OutputStore
from pipeline.storage_config import StorageConfig
from tests.seaweed import ACCESS_KEY, SECRET_KEY, free_port

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
DETECTFLOW = str(BIN / "detectflow")

pytestmark = pytest.mark.usefixtures("prefect_server")


def _ray_start() -> list[str]:
    """`ray start` of a 1-CPU node on loopback with every agent port of its own (the session's
    local cluster holds the default ones)."""
    ports = [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
    ]
    return [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", *ports]


@pytest.fixture(scope="module")
def two_nodes(s3_server):
    """A Ray head and a worker node (1 CPU each) with token auth; their environment, and the
    ``env`` the tests run the CLI with, have no AWS_* variable. Yields the address and env."""
    home = Path(tempfile.mkdtemp(prefix="ray2home-"))
    temp_dir = tempfile.mkdtemp(prefix="ray2-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update({"HOME": str(home), "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"})
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = [*_ray_start(), "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
    processes = [_start(head, env)]
    _wait_for_nodes(address, env, 1)
    processes.append(_start([*_ray_start(), f"--address={address}"], env))
    _wait_for_nodes(address, env, 2)
    try:
        yield {"address": address, "env": env, "temp_dir": temp_dir}
    finally:
        for process in reversed(processes):
            _stop(process)
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)  # `ray start --block` outlasts SIGTERM (measured: > 30 s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def _wait_for_nodes(address: str, env: dict[str, str], count: int) -> None:
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise RuntimeError(f"the Ray cluster at {address} did not reach {count} nodes: {result.stderr[-2000:]}")


def _options(s3_server) -> list[str]:
    """The S3 server, by storage options only."""
    return [
        "-S",
        f"key={ACCESS_KEY}",
        "-S",
        f"secret={SECRET_KEY}",
        "-S",
        f"client_kwargs.endpoint_url={s3_server.endpoint_url}",
    ]


def _cli(args: list[str], env: dict[str, str], *, expect: int = 0) -> str:
    result = subprocess.run([DETECTFLOW, *args], env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == expect, output[-4000:]
    return output


def _model_state(uri: str, s3_server) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(uri, s3_server.storage_options())
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["state_dict"]


def test_synth_train_infer_evaluate_query_on_two_nodes(two_nodes, s3_server, tmp_path) -> None:
    env, cluster = two_nodes["env"], ["--ray-address", two_nodes["address"]]
    options = _options(s3_server)
    bucket = s3_server.new_bucket("twonodes")
    storage_config = StorageConfig(s3_server.storage_options())
    outputs: list[str] = []
    outputs.append(
        _cli(["synth", f"{bucket}/train", "--images", "32", "--image-size", "64", "--shard-size", "8", *options], env)
    )
    # the validation set in-process (the CLI's synth ran once above): one CLI start-up less
    ingest_synthetic(
        f"{bucket}/val", num_images=16, seed=1, image_size=64, shard_size=4, storage_options=storage_config
    )

    train = ["train", f"{bucket}/train", "--preset", "tiny", "--workers", "2", "--steps", "4", "--batch-size", "2"]
    trained = _cli([*train[:2], f"{bucket}/model", *train[2:], "--checkpoint-every", "2", *cluster, *options], env)
    outputs.append(trained)
    assert re.search(r"workers\s+2 on 2 nodes", trained), trained[-2000:]
    # The same job on one node (a local cluster of the CLI's own) learns the same weights.
    local_env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    outputs.append(
        _cli([*train[:2], f"{bucket}/model-one-node", *train[2:], "--checkpoint-every", "2", *options], local_env)
    )
    two, one = (
        _model_state(f"{bucket}/model/model.pt", s3_server),
        _model_state(f"{bucket}/model-one-node/model.pt", s3_server),
    )
    assert two.keys() == one.keys()
    assert all(torch.allclose(two[k].float(), one[k].float(), atol=1e-5) for k in two)

    out = f"{bucket}/out"
    outputs.append(
        _cli(
            [
                "infer",
                f"{bucket}/val",
                out,
                "--model",
                f"{bucket}/model/model.pt",
                "--workers",
                "2",
                *cluster,
                *options,
            ],
            env,
        )
    )
    records = OutputStore(out, s3_server.storage_options()).committed_shards()
    assert len(records) == 4
    assert len({record["node"] for record in records.values()}) == 2  # both nodes did inference work
    manifest = storage.read_json(out + "/_manifest.json", s3_server.storage_options())
    assert {entry["node"] for entry in manifest["shards"].values()} == {r["node"] for r in records.values()}

    evaluated = _cli(["evaluate", f"{bucket}/val", out, *options], env)
    outputs.append(evaluated)
    assert "AP50" in evaluated
    queried = _cli(["query", out, "SELECT count(*) AS n FROM images", "--format", "json", *options], env)
    assert json.loads(queried[queried.index("[") :])[0]["n"] == 16

    _assert_secret_recorded_nowhere(outputs, bucket, s3_server, two_nodes["temp_dir"])


def _assert_secret_recorded_nowhere(outputs: list[str], bucket: str, s3_server, ray_temp_dir: str) -> None:
    """The secret given with -S: not in what the commands printed (their logs), the outputs'
    manifest and commit records, the checkpoints' config, the Prefect database (where the runs'
    parameters are, endpoint included), or any file Ray wrote (logs, session data)."""
    secret = SECRET_KEY.encode()
    assert not any(SECRET_KEY in output for output in outputs)
    fs = s3_server.filesystem()
    for path in fs.find(bucket.removeprefix("s3://")):
        if path.endswith((".json", ".jsonl")):
            assert secret not in fs.cat_file(path), path
    last_checkpoint = fs.find(bucket.removeprefix("s3://") + "/model/checkpoints")[-1]
    checkpoint = torch.load(io.BytesIO(fs.cat_file(last_checkpoint)), weights_only=True)
    assert SECRET_KEY not in json.dumps(checkpoint["config"], default=str)
    database = Path(os.environ["PREFECT_HOME"]) / "prefect.db"
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT parameters FROM flow_run").fetchall()
    recorded = "\n".join(row[0] for row in rows)
    assert s3_server.endpoint_url in recorded  # the runs' parameters are there …
    assert SECRET_KEY not in recorded and "***" in recorded  # … with the secret masked
    for file in Path(database.parent).glob("prefect.db*"):
        assert secret not in file.read_bytes(), file
    for file in Path(ray_temp_dir).rglob("*"):
        if file.is_file() and not file.is_symlink() and file.stat().st_size < 50_000_000:
            assert secret not in file.read_bytes(), file


def test_local_paths_are_refused_on_two_nodes_unless_shared(two_nodes, tmp_path) -> None:
    env, cluster = two_nodes["env"], ["--ray-address", two_nodes["address"]]
    data, model = tmp_path / "data", tmp_path / "model.pt"
    ingest_synthetic(str(data), num_images=4, image_size=32, shard_size=2)
    from detector import build_detector, save_checkpoint
    from detector.synthetic import CATEGORIES

    save_checkpoint(build_detector("tiny", len(CATEGORIES) + 1, class_names=["__background__", *CATEGORIES]), model)
    infer = ["infer", str(data), str(tmp_path / "out"), "--model", str(model), *cluster]
    refused = _cli(infer, env, expect=1)
    assert "is a local path, but the Ray cluster has 2 nodes" in refused and "--shared-fs" in refused
    assert not (tmp_path / "out" / "_commits").exists()

    _cli([*infer, "--shared-fs"], env)  # one machine: the disk is shared indeed
    assert OutputStore(str(tmp_path / "out")).committed_names() == {"shard-00000", "shard-00001"}
