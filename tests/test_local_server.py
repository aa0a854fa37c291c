"""The shared local Prefect server of commands run without a configured Prefect API: the first
command starts it (and says so), the next reuses it, the runs are listed by `prefect flow-run ls`,
it lives in a session of its own (a terminal's Ctrl-C does not reach it), and it stops by itself
after its idle time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flows.local_server import ServerPaths, healthy

BIN = Path(sys.executable).parent
IDLE_S = 6


def test_commands_share_one_local_server_that_stops_when_idle(tmp_path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env |= {
        "DETECTFLOW_HOME": str(tmp_path / "detectflow"),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "DETECTFLOW_SERVER_IDLE_S": str(IDLE_S),
    }
    paths = ServerPaths(tmp_path / "detectflow" / "prefect-server")

    def synth(name: str) -> subprocess.CompletedProcess:
        command = [str(BIN / "detectflow"), "synth", str(tmp_path / name), "--images", "2", "--image-size", "32"]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    first = synth("a")
    assert "started a local Prefect server for detectflow's runs: http://127.0.0.1:" in first.stderr
    assert "detectflow server stop" in first.stderr
    info = json.loads(paths.info.read_text())
    second = synth("b")
    assert "started" not in second.stderr and json.loads(paths.info.read_text()) == info, "reused"
    assert os.getsid(info["pid"]) == info["pid"] != os.getsid(0), "a session of its own"

    listed = subprocess.run(
        [str(BIN / "prefect"), "flow-run", "ls"],
        env={**env, "PREFECT_API_URL": info["url"], "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0 and listed.stdout.count("COMPLETED") == 2, listed.stdout + listed.stderr

    deadline = time.monotonic() + IDLE_S + 30
    while healthy(info["url"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not healthy(info["url"]) and not paths.info.exists(), "stopped after its idle time"
    status = subprocess.run([str(BIN / "detectflow"), "server", "status"], env=env, capture_output=True, text=True)
    assert status.stdout.strip() == "no local server running"
