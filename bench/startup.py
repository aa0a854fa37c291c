"""Command start-up: what a user waits for beyond the work itself.

Times, interleaved over ``--reps`` rounds on this machine (median of each):
- ``import``: ``python -c "import detector, pipeline"`` (the floor: importing the project);
- ``synth``: ``detectflow synth D --images 20`` and ``infer``: ``detectflow infer`` of those 20 small
  images with the tiny model (a local Ray cluster started by the command), each on the shared local
  Prefect server (started once, before the rounds) and, A/B, on a temporary server per command
  (``DETECTFLOW_LOCAL_SERVER=0``, what every command paid before);
- the parts: importing the flows (prefect), starting and stopping a local Ray cluster, the shared
  server's cold start.
Writes bench/results/startup.json with the ratios the issue sets targets for (synth ≤ 2.5×, infer
≤ 5× the import).

    .venv/bin/python bench/startup.py --reps 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import median, write_result  # noqa: E402

BIN = Path(sys.executable).parent


def _timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds


def _environment(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "RAY_ADDRESS"))}
    return {**env, "DETECTFLOW_HOME": str(home / "detectflow"), "PREFECT_HOME": str(home / "prefect")}


def _round(work: Path, env: dict[str, str], rep: int, mode: str) -> dict[str, float]:
    run_env = {**env, "DETECTFLOW_LOCAL_SERVER": "0"} if mode == "temporary" else env
    cli = str(BIN / "detectflow")
    return {
        "synth": _timed([cli, "synth", f"synth-{mode}-{rep}", "--images", "20"], run_env, work),
        "infer": _timed([cli, "infer", "data", f"out-{mode}-{rep}", "--model", "model.pt"], run_env, work),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="detectflow-startup-"))
    env = _environment(work)
    python = sys.executable
    subprocess.run(
        [
            python,
            "-c",
            "from detector import build_detector, save_checkpoint; "
            "save_checkpoint(build_detector('tiny', 4), 'model.pt')",
        ],
        cwd=work,
        env=env,
        check=True,
    )
    parts = {"server_cold_start": _timed([str(BIN / "detectflow"), "server", "start"], env, work)}
    _timed([str(BIN / "detectflow"), "synth", "data", "--images", "20"], env, work)
    rounds: dict[str, list[float]] = {}
    try:
        for rep in range(args.reps):
            rounds.setdefault("import", []).append(_timed([python, "-c", "import detector, pipeline"], env, work))
            for mode in ("shared", "temporary"):
                for name, seconds in _round(work, env, rep, mode).items():
                    rounds.setdefault(f"{name}_{mode}_server", []).append(seconds)
            rounds.setdefault("import_flows", []).append(_timed([python, "-c", "import flows.pipelines"], env, work))
            rounds.setdefault("ray_start_stop", []).append(
                _timed([python, "-c", "import ray; ray.init(include_dashboard=False); ray.shutdown()"], env, work)
            )
    finally:
        subprocess.run([str(BIN / "detectflow"), "server", "stop"], env=env, cwd=work, capture_output=True)
    medians = {name: median(values) for name, values in rounds.items()}
    ratios = {
        "synth_over_import": medians["synth_shared_server"] / medians["import"],
        "infer_over_import": medians["infer_shared_server"] / medians["import"],
        "synth_over_import_temporary_server": medians["synth_temporary_server"] / medians["import"],
        "infer_over_import_temporary_server": medians["infer_temporary_server"] / medians["import"],
    }
    for name, value in {**medians, **parts, **ratios}.items():
        print(f"{name:<40} {value:8.2f}")
    write_result(
        "startup",
        {
            "reps": args.reps,
            "seconds_median": medians,
            "seconds_all": rounds,
            "parts": parts,
            "ratios": ratios,
            "targets": {"synth_over_import": 2.5, "infer_over_import": 5.0},
        },
    )


if __name__ == "__main__":
    main()
