"""A local Prefect server shared by detectflow commands, so that a command does not start (and wait
for) a temporary one of its own.

When no Prefect API is configured (no ``PREFECT_API_URL`` in the environment or the active Prefect
profile), the first command that runs a flow starts ``prefect server start`` under a small supervisor
(``python -m flows.local_server serve``) in a session of its own: a Ctrl-C in the terminal never
reaches it. Later commands find it through ``server.json`` and reuse it. The supervisor stops the
server after ``idle_s`` seconds (default 30 minutes, ``DETECTFLOW_SERVER_IDLE_S``) during which no
command ran; ``detectflow server stop`` stops it at once. The server keeps Prefect's own database
(``PREFECT_HOME``), so ``prefect flow-run ls`` and the UI show the runs.

State, under ``DETECTFLOW_HOME`` (default ``~/.detectflow``) ``/prefect-server/``:
``server.json`` (supervisor pid, server pid, url), ``server.log``, ``lock`` (one starter at a time),
``active/<pid>`` (one file per command in flight), ``last_used`` (its mtime is the last activity).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

DEFAULT_IDLE_S = 1800.0
DEFAULT_PORT = 4200
START_TIMEOUT_S = 120.0
POLL_S = 2.0


@dataclass(frozen=True)
class ServerPaths:
    """Where the shared server's state lives."""

    root: Path

    @classmethod
    def default(cls) -> ServerPaths:
        home = os.environ.get("DETECTFLOW_HOME") or "~/.detectflow"
        return cls(Path(home).expanduser() / "prefect-server")

    @property
    def info(self) -> Path:
        return self.root / "server.json"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def active(self) -> Path:
        return self.root / "active"

    @property
    def last_used(self) -> Path:
        return self.root / "last_used"


def configured_api_url() -> str | None:
    """The Prefect API the user configured: ``PREFECT_API_URL``, else the active profile's (read
    without importing prefect, whose settings are fixed at import)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def idle_seconds() -> float:
    return float(os.environ.get("DETECTFLOW_SERVER_IDLE_S") or DEFAULT_IDLE_S)


def read_info(paths: ServerPaths) -> dict[str, Any] | None:
    try:
        return json.loads(paths.info.read_text())
    except (OSError, ValueError):
        return None


def healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def running(paths: ServerPaths) -> dict[str, Any] | None:
    """The shared server's ``server.json`` if its supervisor is alive and the API answers."""
    info = read_info(paths)
    if info and _alive(info["pid"]) and healthy(info["url"]):
        return info
    return None


def ensure(paths: ServerPaths, announce: Callable[[str], None]) -> str:
    """The API URL of the shared server, started (and ``announce``d) if none is running; registers
    this process as a command in flight until it exits."""
    paths.active.mkdir(parents=True, exist_ok=True)
    _register(paths)
    with _locked(paths):
        info = running(paths)
        if info is None:
            info = _start(paths, idle_seconds())
            announce(
                f"started a local Prefect server for detectflow's runs: {info['ui']} (runs, logs, UI); it stops "
                f"after {idle_seconds() / 60:.0f} min without commands, or now with `detectflow server stop`"
            )
    return info["url"]


def stop(paths: ServerPaths, timeout: float = 30.0) -> dict[str, Any] | None:
    """Stop the shared server; returns what was stopped (None when none ran)."""
    info = read_info(paths)
    if not info or not _alive(info["pid"]):
        paths.info.unlink(missing_ok=True)
        return None
    os.kill(info["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(info["pid"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(info["pid"]):
        os.kill(info["pid"], signal.SIGKILL)
    return info


def _start(paths: ServerPaths, idle_s: float) -> dict[str, Any]:
    port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else _free_port()
    paths.info.unlink(missing_ok=True)
    paths.last_used.touch()
    command = [sys.executable, "-m", "flows.local_server", "serve", "--port", str(port), "--idle-s", str(idle_s)]
    command += ["--root", str(paths.root)]
    with open(paths.log, "ab") as log:
        supervisor = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        info = read_info(paths)
        if info and healthy(info["url"]):
            return info
        if supervisor.poll() is not None:
            break
        time.sleep(0.2)
    supervisor.kill()
    tail = paths.log.read_text(errors="replace")[-1500:]
    raise RuntimeError(f"the local Prefect server did not start (log: {paths.log}):\n{tail}")


def _register(paths: ServerPaths) -> None:
    """Mark this process as a command in flight (the supervisor does not stop the server under it)."""
    (paths.active / str(os.getpid())).touch()
    paths.last_used.touch()


@contextlib.contextmanager
def _locked(paths: ServerPaths) -> Iterator[None]:
    paths.root.mkdir(parents=True, exist_ok=True)
    with open(paths.root / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _commands_in_flight(paths: ServerPaths) -> int:
    """Registered commands still alive (files of dead ones are removed, touching ``last_used``)."""
    alive = 0
    for entry in paths.active.iterdir() if paths.active.exists() else ():
        if entry.name.isdigit() and _alive(int(entry.name)):
            alive += 1
        else:
            entry.unlink(missing_ok=True)
            paths.last_used.touch()
    return alive


def serve(paths: ServerPaths, port: int, idle_s: float) -> int:
    """The supervisor: run ``prefect server start`` until ``idle_s`` passes with no command in flight,
    or SIGTERM/SIGINT; then stop it and remove ``server.json``."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_API_PORT": str(port)}
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"], env=env
    )
    stopping: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: stopping.append(number))
    url = f"http://127.0.0.1:{port}/api"
    info = {"pid": os.getpid(), "server_pid": server.pid, "url": url, "ui": f"http://127.0.0.1:{port}"}
    info["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    paths.info.write_text(json.dumps(info, indent=2))
    try:
        while not stopping and server.poll() is None:
            time.sleep(POLL_S)
            if _commands_in_flight(paths) == 0 and time.time() - paths.last_used.stat().st_mtime > idle_s:
                print(f"stopping the server after {idle_s:.0f} s without commands", flush=True)
                break
    finally:
        if read_info(paths) == info:
            paths.info.unlink(missing_ok=True)
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.local_server")
    parser.add_argument("action", choices=["serve"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-s", type=float, default=DEFAULT_IDLE_S)
    parser.add_argument("--root", type=Path, required=True)
    args = parser.parse_args(argv)
    return serve(ServerPaths(args.root), args.port, args.idle_s)


if __name__ == "__main__":
    sys.exit(main())
