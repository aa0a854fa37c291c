"""Job specs and their storage settings: validated once, serialisable, secrets never in a record."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from pipeline import storage
from pipeline.cluster import ClusterInfo, check_locations
from pipeline.jobs import ClusterSpec, DetectNewSpec, InferenceSpec, IngestSpec, TrainSpec
from pipeline.storage_config import REDACTED, StorageConfig

SECRET = "s3cr3t-value-123"


def test_literal_secrets_travel_beside_the_fields() -> None:
    config = StorageConfig.parse(["key=AKIA1", f"secret={SECRET}", "client_kwargs.endpoint_url=http://h:9000"])
    assert config.options == {"key": "AKIA1", "secret": REDACTED, "client_kwargs": {"endpoint_url": "http://h:9000"}}
    for shown in (repr(config), json.dumps(dataclasses.asdict(config)), str(config)):
        assert SECRET not in shown
    carried = pickle.loads(pickle.dumps(config))  # what Ray does with an actor's arguments
    assert carried.fsspec_options("s3")["secret"] == SECRET
    assert config.secret_values() == {SECRET}
    # options mean nothing to local files: none are handed to them
    assert storage.filesystem("/tmp/x", config)[0].storage_options == {}


def test_references_resolve_on_the_driver_and_travel_as_values(monkeypatch) -> None:
    monkeypatch.setenv("DETECTFLOW_TEST_SECRET", SECRET)
    config = StorageConfig.parse(["key=AKIA1", "secret=env:DETECTFLOW_TEST_SECRET"])
    assert config.options["secret"] == "env:DETECTFLOW_TEST_SECRET"  # a reference is not a secret
    resolved = config.resolve()
    monkeypatch.delenv("DETECTFLOW_TEST_SECRET")  # a worker on another node: the variable is not there
    assert pickle.loads(pickle.dumps(resolved)).fsspec_options("s3")["secret"] == SECRET
    with pytest.raises(ValueError, match="DETECTFLOW_TEST_SECRET, which is not set on"):
        config.fsspec_options("s3")
    looked_up = StorageConfig({"secret": "prefect-secret:s3"}).resolve(lambda kind, name: f"{kind}/{name}")
    assert looked_up.fsspec_options("s3")["secret"] == "prefect-secret/s3"
    with pytest.raises(ValueError, match="literal secret to an earlier run"):
        StorageConfig({"secret": REDACTED}).resolve()  # a recorded run's parameters hold no secret


def test_driver_aws_environment_is_captured_for_s3_only(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://driver:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIADRIVER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    resolved = StorageConfig().resolve()
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.delenv(name)
    options = resolved.fsspec_options("s3")
    assert options["client_kwargs"] == {"endpoint_url": "http://driver:9000", "region_name": "eu-west-3"}
    assert (options["key"], options["secret"]) == ("AKIADRIVER", SECRET)
    assert resolved.fsspec_options("gs") == {} and SECRET not in repr(resolved)
    # an identity given as options is never mixed with one from the environment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    given = StorageConfig({"key": "AKIAGIVEN", "secret": "given"}).resolve().fsspec_options("s3")
    assert given["secret"] == "given"
    assert StorageConfig({"anon": True}).resolve().fsspec_options("s3").get("secret") is None


def test_specs_validate_once_at_construction() -> None:
    good = {"data_uri": "s3://b/d", "out_uri": "s3://b/o", "model_uri": "/models/m.pt"}
    spec = InferenceSpec(**good)
    assert spec.model_uri == "file:///models/m.pt"  # normalised once
    for bad, message in [
        ({"device": "tpu"}, "device must be auto, cpu or cuda"),
        ({"batch_size": 0}, "batch_size must be ≥ 1"),
        ({"score_threshold": 1.5}, "score_threshold must be within"),
        ({"amp": "auto"}, "amp must be off, bf16 or fp16"),
        ({"data_uri": " "}, "data_uri must be a URI"),
    ]:
        with pytest.raises(ValueError, match=message):
            InferenceSpec(**{**good, **bad})
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        TrainSpec("s3://b/d", "s3://b/m", preset="nope")
    with pytest.raises(ValueError, match="epochs or steps"):
        TrainSpec("s3://b/d", "s3://b/m", epochs=1, steps=2)
    with pytest.raises(ValueError, match="needs images_uri"):
        IngestSpec("s3://b/d", source="images")


def test_spec_json_round_trip_keeps_everything_but_secrets() -> None:
    storage_config = StorageConfig.parse([f"secret={SECRET}", "key=AKIA1"])
    spec = DetectNewSpec(
        "s3://b/in", InferenceSpec("s3://b/d", "s3://b/o", "s3://b/m.pt", workers=3, storage=storage_config)
    )
    public = json.dumps(spec.public())
    assert SECRET not in public
    rebuilt = DetectNewSpec(**json.loads(public))  # as Prefect validates a deployment's parameters
    assert rebuilt.inference.workers == 3 and rebuilt.ingest().only_new and rebuilt.ingest().out_uri == "s3://b/d"
    assert rebuilt == spec  # equal fields; the secret itself stayed behind


def test_local_locations_on_a_multi_node_cluster() -> None:
    two_nodes, one_node = ClusterInfo(nodes=2, cpus=2, gpus=0), ClusterInfo(nodes=1, cpus=2, gpus=0)
    uris = ["s3://b/d", "file:///data/out"]
    check_locations(uris, ClusterSpec(), one_node)
    with pytest.raises(ValueError, match="is a local path, but the Ray cluster has 2 nodes.*--shared-fs"):
        check_locations(uris, ClusterSpec(), two_nodes)
    check_locations(uris, ClusterSpec(shared_filesystem=True), two_nodes)
    with pytest.raises(ValueError, match="in-memory location"):
        check_locations(["memory://x"], ClusterSpec(shared_filesystem=True), one_node)
