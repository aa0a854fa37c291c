"""An output prefix belongs to one model and one set of row-changing settings: another model or
another score threshold is refused before anything under the output changes, naming both; the same
model and settings resume; ``--replace`` rewrites a clean single-model output; an output written
before identities were recorded belongs to the model of its commit records; of two runs claiming a
fresh output at once, one wins. Outputs on the real S3 server, the in-process executor."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from detector import build_detector, save_checkpoint
from detector.synthetic import CATEGORIES
from flows.cli import app
from pipeline import storage
from pipeline.inference import output_identity, run_inference
from pipeline.ingest import ingest_synthetic
from pipeline.jobs import InferenceSpec
from pipeline.outputs import IDENTITY, OutputIdentity, OutputStore
from pipeline.query import query
from pipeline.worker import model_id_of

NUM_SHARDS, PER_SHARD = 3, 2


def _model(path: Path, seed: int) -> Path:
    """A tiny model with random weights (``seed``) that keeps every box."""
    torch.manual_seed(seed)
    model = build_detector(
        "tiny", len(CATEGORIES) + 1, class_names=["__background__", *CATEGORIES], box_score_thresh=0.0
    )
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def setup(s3_server, tmp_path_factory) -> dict:
    """Two models (A, B) and a small synthetic dataset, in the S3 server."""
    bucket = s3_server.new_bucket("identity")
    folder = tmp_path_factory.mktemp("models")
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        data = _model(folder / f"{name}.pt", seed).read_bytes()
        storage.write_bytes(f"{bucket}/{name}.pt", data)
        models[name] = (f"{bucket}/{name}.pt", model_id_of(data))
    dataset = ingest_synthetic(bucket + "/data", num_images=NUM_SHARDS * PER_SHARD, image_size=64, shard_size=PER_SHARD)
    return {"bucket": bucket, "data": dataset.uri, "models": models}


def _spec(setup: dict, out: str, model: str = "a", **settings) -> InferenceSpec:
    return InferenceSpec(setup["data"], out, setup["models"][model][0], executor="local", device="cpu", **settings)


def _listing(out: str) -> dict[str, tuple]:
    """Every object under ``out`` with its ETag and modification time."""
    fs, path = storage.filesystem(out)
    fs.invalidate_cache()
    return {p: (info.get("ETag"), info.get("LastModified")) for p, info in fs.find(path, detail=True).items()}


@pytest.fixture
def interrupted(setup) -> str:
    """An output of model A with one shard left to do (its commit record gone), as an interrupted
    run leaves it."""
    out = f"{setup['bucket']}/out-{uuid.uuid4().hex[:8]}"
    summary = run_inference(_spec(setup, out))
    assert summary.shards_done == NUM_SHARDS and not summary.failed
    storage.delete(OutputStore(out).commit_uri("shard-00002"))
    return out


def test_another_model_is_refused_before_anything_changes(setup, interrupted) -> None:
    model_a, model_b = setup["models"]["a"][1], setup["models"]["b"][1]
    identity = storage.read_json(f"{interrupted}/{IDENTITY}")
    assert identity["model_id"] == model_a and identity["settings"]["score_threshold"] is None
    assert OutputStore(interrupted).read_manifest()["identity"]["model_id"] == model_a
    before = _listing(interrupted)

    with pytest.raises(ValueError) as refused:
        run_inference(_spec(setup, interrupted, "b"))
    message = str(refused.value)
    assert model_a in message and model_b in message
    assert "--replace" in message and "new output prefix" in message
    assert _listing(interrupted) == before, "nothing under the output changed"


def test_another_score_threshold_is_refused(setup, interrupted) -> None:
    before = _listing(interrupted)
    with pytest.raises(ValueError, match=r"score_threshold None \(output\) vs 0\.5 \(this run\)") as refused:
        run_inference(_spec(setup, interrupted, score_threshold=0.5))
    assert "--replace" in str(refused.value) and "model_id" not in str(refused.value)
    assert _listing(interrupted) == before


def test_same_model_and_settings_resume(setup, interrupted) -> None:
    """Batch size and threads are not part of the identity: the run resumes."""
    summary = run_inference(_spec(setup, interrupted, batch_size=1, threads_per_worker=1))
    assert summary.shards_done == 1 and summary.shards_skipped == NUM_SHARDS - 1 and not summary.failed
    assert OutputStore(interrupted).read_table("images").num_rows == NUM_SHARDS * PER_SHARD


def test_output_without_identity_file_belongs_to_the_model_of_its_commit_records(setup, interrupted) -> None:
    """An output of an older version (no ``_identity.json``): model B is refused by A's id from the
    commit records; A resumes and records the identity."""
    storage.delete(f"{interrupted}/{IDENTITY}")
    assert OutputStore(interrupted).read_identity() == OutputIdentity(setup["models"]["a"][1], None)
    with pytest.raises(ValueError, match=setup["models"]["a"][1]):
        run_inference(_spec(setup, interrupted, "b"))
    assert not storage.exists(f"{interrupted}/{IDENTITY}")
    summary = run_inference(_spec(setup, interrupted, score_threshold=0.2))  # settings were not recorded
    assert summary.shards_done == 1
    assert OutputStore(interrupted).read_identity() == output_identity(
        _spec(setup, interrupted, score_threshold=0.2), setup["models"]["a"][1]
    )


def test_older_output_of_several_models_is_refused(setup, interrupted) -> None:
    """No ``_identity.json`` and commit records of two models (what the bug left behind): every
    run is refused, naming both, until ``replace``."""
    store = OutputStore(interrupted)
    storage.delete(store.identity_uri)
    record = storage.read_json(store.commit_uri("shard-00001"))
    storage.write_json(store.commit_uri("shard-00001"), {**record, "model_id": "0123456789abcdef"})
    with pytest.raises(ValueError, match="several models .*0123456789abcdef") as refused:
        run_inference(_spec(setup, interrupted))
    assert setup["models"]["a"][1] in str(refused.value) and "--replace" in str(refused.value)
    summary = run_inference(_spec(setup, interrupted, replace=True))
    assert summary.shards_done == NUM_SHARDS and store.read_identity().model_id == setup["models"]["a"][1]


def test_replace_through_the_cli_rewrites_a_clean_single_model_output(setup, interrupted, prefect_server) -> None:
    """Model B onto A's complete output: the CLI refuses (not "nothing to do"); with ``--replace``
    the output is B's alone. ``metrics.json`` of the old run goes too; other files stay."""
    run_inference(_spec(setup, interrupted))  # complete: nothing left for a run to do
    storage.write_json(f"{interrupted}/metrics.json", {"AP": 0.1})
    storage.write_bytes(f"{interrupted}/notes.txt", b"not ours")
    model_b_uri, model_b = setup["models"]["b"]
    args = ["infer", setup["data"], interrupted, "--model", model_b_uri, "--local", "--device", "cpu"]
    runner = CliRunner()

    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "--replace" in refused.output and model_b in refused.output

    replaced = runner.invoke(app, [*args, "--replace"])
    assert replaced.exit_code == 0, replaced.output
    models = query(interrupted, "SELECT DISTINCT model_id FROM images").column("model_id").to_pylist()
    assert models == [model_b]
    assert query(interrupted, "SELECT count(*) AS n FROM images").column("n").to_pylist() == [NUM_SHARDS * PER_SHARD]
    assert query(interrupted, "SELECT DISTINCT model_id FROM detections").column("model_id").to_pylist() == [model_b]
    store = OutputStore(interrupted)
    assert {record["model_id"] for record in store.committed_shards().values()} == {model_b}
    assert store.read_identity().model_id == model_b and store.read_manifest()["model_id"] == model_b
    assert not storage.exists(f"{interrupted}/metrics.json") and storage.exists(f"{interrupted}/notes.txt")


def test_two_runs_claiming_a_fresh_output_at_once(storage_root) -> None:
    """Write-if-absent on each store: of two claims at the same moment exactly one wins; the loser
    is refused against the winner; a later claim of the winner's identity writes nothing."""
    uri = storage.join(storage_root, "out")
    store = OutputStore(uri)
    identities = [OutputIdentity(f"model-{i}", {"score_threshold": None}) for i in range(2)]
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def claim(identity: OutputIdentity) -> None:
        barrier.wait()
        try:
            store.claim(identity, run_id=identity.model_id)
            outcomes.append("claimed")
        except ValueError as exc:
            outcomes.append(f"refused: {exc}")

    threads = [threading.Thread(target=claim, args=(identity,)) for identity in identities]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.split(":")[0] for o in outcomes) == ["claimed", "refused"], outcomes
    winner = store.read_identity()
    assert winner in identities
    store.claim(winner, run_id="a later run")  # the same identity: nothing to write
    assert storage.read_json(store.identity_uri)["run_id"] == winner.model_id
