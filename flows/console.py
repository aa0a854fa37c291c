"""What a command prints: its own lines, the warnings a user can act on, and — only with
``--verbose`` — the orchestration logs and tracebacks of the libraries underneath.

Prefect's flow and task logs still reach the Prefect run (its API log handler is untouched); only
the terminal copy is filtered.
"""

from __future__ import annotations

import logging

# Library loggers whose messages a user cannot act on (Ray's notice that token auth is on; Ray
# Train's per-report lines; the placement-group cleaner's traceback when a run is stopped).
NOISY_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",
    "ray.train",
    "ray.tune",
    "ray.util.placement_group",
    "ray.train.v2._internal.execution.worker_group",
)
SHOWN_PREFIXES = ("pipeline", "flows", "prefect.flow_runs", "prefect.task_runs")


class ActionableOnly(logging.Filter):
    """Lets through warnings from detectflow's own code and flow runs; drops the rest (Prefect's
    per-task chatter, "Finished in state …", the tracebacks of a failure the command reports in one
    line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return logging.WARNING <= record.levelno < logging.ERROR and record.name.startswith(SHOWN_PREFIXES)


def configure(verbose: bool) -> None:
    """Set the terminal's verbosity for this process (idempotent)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.CRITICAL)
    for handler in _console_handlers():
        for old in [f for f in handler.filters if isinstance(f, ActionableOnly)]:
            handler.removeFilter(old)
        if not verbose:
            handler.addFilter(ActionableOnly())


def _console_handlers() -> list[logging.Handler]:
    """Handlers writing to the terminal: Prefect's console handler on the root logger and on the
    loggers it configures."""
    names = ["", "prefect", "uvicorn", "fastapi"]
    handlers = [h for name in names for h in logging.getLogger(name).handlers]
    return [h for h in handlers if type(h).__name__ in {"PrefectConsoleHandler", "StreamHandler"}]
