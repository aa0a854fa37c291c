"""Ctrl-C in the terminal: SIGINT to the whole foreground process group of ``detectflow infer`` and
``detectflow train``, each on a real local Ray cluster started by the command, mid-run. The command
exits within seconds with a line saying how to continue, leaves no process of its session behind,
records the run as interrupted, and the re-run (``--resume`` for training) completes with the
outputs of a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from detector import build_detector, load_checkpoint, save_checkpoint
from detector.synthetic import CATEGORIES
from pipeline import storage
from pipeline.ingest import ingest_synthetic

DETECTFLOW = str(Path(sys.executable).parent / "detectflow")
EXIT_WITHIN_S = 30


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """``detectflow ARGS`` as a terminal would run it: a session (and process group) of its own,
    SIGINT at its default (a shell's background job would have it ignored)."""
    return subprocess.Popen(
        [DETECTFLOW, *args],
        stdout=open(log, "wb"),  # noqa: SIM115 - owned by the child
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _session_processes(sid: int) -> list[str]:
    listing = subprocess.run(["ps", "-o", "pid=,sid=,args="], capture_output=True, text=True).stdout
    listing += subprocess.run(["ps", "-e", "-o", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return sorted({line.strip() for line in listing.splitlines() if line.split()[1:2] == [str(sid)]})


def _interrupt(process: subprocess.Popen, log: Path) -> str:
    """Ctrl-C: SIGINT to the process group; the command must exit within EXIT_WITHIN_S with 130,
    and nothing of its session may outlive it (given a few seconds to finish exiting)."""
    os.killpg(process.pid, signal.SIGINT)
    started = time.monotonic()
    try:
        code = process.wait(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"still running {EXIT_WITHIN_S} s after Ctrl-C:\n{log.read_text()[-3000:]}") from None
    output = log.read_text()
    assert code == 130, output
    deadline = time.monotonic() + 10
    while (left := _session_processes(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for line in left:
        os.kill(int(line.split()[0]), signal.SIGKILL)
    assert left == [], f"left running after the command exited ({time.monotonic() - started:.1f} s): {left}"
    return output


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prefect_server) -> dict:
    folder = tmp_path_factory.mktemp("interrupts")
    dataset = ingest_synthetic(f"file://{folder}/data", num_images=48, image_size=64, shard_size=4, seed=3)
    torch.manual_seed(0)
    model = build_detector("tiny", len(CATEGORIES) + 1, class_names=["__background__", *CATEGORIES])
    save_checkpoint(model, folder / "model.pt")
    return {"folder": folder, "data": dataset.uri, "model": str(folder / "model.pt")}


def _rows(out: Path, table: str) -> list[tuple]:
    """The rows of an output table, run ids left out, floats rounded (a clean run that batches
    and threads differently differs in the last bits), in a fixed order."""
    rows = pq.read_table(out / table).drop_columns(["run_id"]).to_pylist()
    return sorted(tuple((k, round(v, 2) if isinstance(v, float) else v) for k, v in sorted(r.items())) for r in rows)


def test_ctrl_c_stops_inference_and_the_rerun_completes_it(setup) -> None:
    folder = setup["folder"]
    out = folder / "infer-out"
    args = ["infer", setup["data"], str(out), "--model", setup["model"], "--workers", "1", "--batch-size", "1"]
    process = _start(args, folder / "infer.log")
    _wait_for(lambda: len(list((out / "_commits").glob("*.json"))) >= 1, 240, "a first committed shard")
    output = _interrupt(process, folder / "infer.log")
    assert output.strip().splitlines()[-1] == (
        "interrupted: work already committed is kept; run the same command again to continue"
    )
    manifest = storage.read_json(f"file://{out}/_manifest.json")
    assert manifest["state"] == "interrupted"
    assert not (out / "_lease.json").exists(), "the lease was released"
    committed = len(list((out / "_commits").glob("*.json")))
    assert 1 <= committed < 12, "stopped mid-run"

    rerun = subprocess.run([DETECTFLOW, *args, "--local"], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{12 - committed} shards, {committed} already committed" in rerun.stdout
    clean = folder / "infer-clean"
    subprocess.run([DETECTFLOW, "infer", setup["data"], str(clean), "--model", setup["model"], "--local"], check=True)
    for table in ("images", "detections"):
        assert _rows(out, table) == _rows(clean, table), table


def test_ctrl_c_stops_training_and_resume_continues_it(setup) -> None:
    folder = setup["folder"]
    out = folder / "train-out"
    args = ["train", setup["data"], str(out), "--preset", "tiny", "--workers", "1", "--steps", "16"]
    args += ["--batch-size", "2", "--checkpoint-every", "2", "--seed", "1"]
    process = _start(args, folder / "train.log")
    _wait_for(lambda: len(list((out / "checkpoints").glob("*.pt"))) >= 1, 240, "a first checkpoint")
    output = _interrupt(process, folder / "train.log")
    assert output.strip().splitlines()[-1] == (
        "interrupted: work already committed is kept; add --resume to continue from the last checkpoint"
    )
    assert not (out / "model.pt").exists()
    resumed = subprocess.run([DETECTFLOW, *args, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    recipe, steps = resumed.stdout.splitlines()[:2]
    assert recipe.startswith("recipe      AdamW, 1 worker × 2 images per step") and steps.startswith("steps       16 ")
    weights = load_checkpoint(out / "model.pt").state_dict()
    assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point())
