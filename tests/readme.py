"""Runs the command blocks of README.md that a user is told to run, so that they keep working as
written. A block is marked in the README by ``<!-- readme-test: NAME -->`` on the line before its
```` ```bash ```` fence. The tests run a block with bash (``set -euo pipefail``) after a few stated
replacements: the ports of the session's servers for the documented ones, smaller sizes, and a
service the session already runs (``prefect server start``) left out. Each replaced text must still
be in the block, so the README cannot drift away from what is run."""

from __future__ import annotations

import subprocess
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
DONE = "README-BLOCK-DONE"


def block(name: str) -> str:
    """The text of the bash block marked ``readme-test: name``."""
    text = README.read_text()
    marker = f"<!-- readme-test: {name} -->\n```bash\n"
    start = text.index(marker) + len(marker)
    return text[start : text.index("\n```", start)] + "\n"


def run_block(
    name: str, *, cwd: Path, env: dict[str, str], replace: dict[str, str], timeout: float, check: bool = True
) -> subprocess.CompletedProcess:
    """Run block ``name`` with the ``replace``ments applied; fails naming the block unless every
    command succeeded (with ``check``; else the caller looks at the result)."""
    script = block(name)
    for old, new in replace.items():
        assert old in script, f"README block {name!r} no longer contains {old!r}: update tests/readme.py's caller"
        script = script.replace(old, new)
    result = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{script}\necho {DONE}\n"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert not check or (result.returncode == 0 and result.stdout.rstrip().endswith(DONE)), (
        f"README block {name!r} failed ({result.returncode}):\n{script}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    )
    return result
