"""The files of deploy/ parse and point at real things: flow entrypoints that import and accept
their parameters, valid cron schedules, CLI commands that exist with the options given, paths the
Dockerfile copies, token authentication wherever a Ray cluster is defined."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml
from typer.main import get_command

from flows.cli import app

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
CLI = get_command(app)


def _prefect_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "prefect.yaml").read_text())


def _check_cli(command_line: str) -> None:
    """``detectflow …`` parses with the real CLI: the command exists and takes these arguments."""
    words = shlex.split(command_line)
    assert words[0] == "detectflow", command_line
    group = CLI
    args = words[1:]
    while hasattr(group, "commands") and args[:1] != ["--help"]:  # a group: the next word is a command
        assert args and args[0] in group.commands, f"no command {args[:1]} in {command_line!r}"
        group, args = group.commands[args[0]], args[1:]
    try:
        group.make_context("detectflow", list(args), resilient_parsing=False)
    except Exception as exc:  # Typer vendors click: its exception classes are private
        if getattr(exc, "exit_code", None) == 0:  # --help: parsed, exits 0
            return
        raise AssertionError(f"{command_line!r}: {exc}") from exc


def test_prefect_yaml_deployments_reference_real_flows_with_valid_parameters() -> None:
    from prefect import Flow
    from prefect.client.schemas.schedules import CronSchedule

    config = _prefect_yaml()
    names = [d["name"] for d in config["deployments"]]
    assert len(names) == len(set(names))
    assert {"nightly", "weekly"} <= set(names)
    flows_seen = set()
    for deployment in config["deployments"]:
        path, _, attribute = deployment["entrypoint"].partition(":")
        assert (REPO / path).is_file(), deployment["entrypoint"]
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, attribute)
        assert isinstance(flow, Flow), deployment["entrypoint"]
        flows_seen.add(flow.name)
        flow.validate_parameters(deployment.get("parameters", {}))  # names and types
        for schedule in deployment.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
        assert deployment["work_pool"]["name"].startswith("detectflow")
    assert {"detect-new-images", "train-and-evaluate", "inference", "ingest", "evaluate"} <= flows_seen
    nightly = next(d for d in config["deployments"] if d["name"] == "nightly")
    assert nightly["entrypoint"].endswith(":detect_new_images_flow")
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"


def test_prefect_yaml_rejects_a_wrong_parameter() -> None:
    """The check above can fail: a parameter the flow does not take is refused."""
    from prefect.exceptions import ParameterTypeError, SignatureMismatchError

    from flows.pipelines import inference_flow

    spec = {"data_uri": "s3://a/d", "out_uri": "s3://a/o", "model_uri": "s3://a/m.pt"}
    inference_flow.validate_parameters({"spec": spec})
    with pytest.raises(ParameterTypeError):
        inference_flow.validate_parameters({"spec": {**spec, "batch_size": "x"}})  # a type
    with pytest.raises(ParameterTypeError, match="batch_size must be ≥ 1"):
        inference_flow.validate_parameters({"spec": {**spec, "batch_size": 0}})  # the spec's own validation
    with pytest.raises(SignatureMismatchError):
        inference_flow.validate_parameters({"data_uri": "s3://a/d"})  # the old flat parameters


def test_ray_cluster_file() -> None:
    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    assert config["head_node_type"] in config["available_node_types"]
    assert any("gpu" in name for name in config["available_node_types"])
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"]
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host" in head
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])
    for command in config["setup_commands"]:
        _check_cli(command.split(">")[0].strip())


def test_kuberay_manifests() -> None:
    cluster = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((DEPLOY / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["authOptions"]["mode"] == "token"
        for group in spec["workerGroupSpecs"]:
            [container] = group["template"]["spec"]["containers"]
            assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    _check_cli(job["spec"]["entrypoint"])


def test_dockerfile_copies_real_paths_and_runs_the_cli() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in re.sub(r"\\\n", " ", text).splitlines() if line and not line.startswith("#")]
    assert lines[0].startswith("FROM nvidia/cuda:")
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), source
    assert any("detectflow --help" in line for line in lines if line.startswith("RUN"))
    assert "/opt/detectflow" in text  # where the docker deployments of prefect.yaml pull from
    docker_pulls = [d["pull"] for d in _prefect_yaml()["deployments"] if "pull" in d]
    assert docker_pulls and all(
        step["prefect.deployments.steps.set_working_directory"]["directory"] == "/opt/detectflow"
        for pull in docker_pulls
        for step in pull
    )


def test_readme_commands_exist() -> None:
    """Every `detectflow …` line of the README's shell blocks is a real command with valid options."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)\n(.*?)```", readme, flags=re.S)
    commands = []
    for block in blocks:
        variables: dict[str, str] = {}  # NAME="…" lines of the block, expanded in later lines
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            for name, value in variables.items():
                line = line.replace(f"${name}", value)
            if assignment := re.fullmatch(r'([A-Z][A-Z0-9_]*)="(.*)"', line):
                variables[assignment[1]] = assignment[2]
            for part in re.split(r"&&|;", line):
                part = part.strip()
                if part.startswith("detectflow "):
                    commands.append(part.split(" #")[0])
    assert len(commands) >= 5
    for command in commands:
        _check_cli(command)


def test_cli_check_can_fail() -> None:
    with pytest.raises(AssertionError, match="No such option"):
        _check_cli("detectflow infer a b --no-such-option 3")
    with pytest.raises(AssertionError):
        _check_cli("detectflow detect-everything a")
