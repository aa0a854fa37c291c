"""A job's storage settings: fsspec options that may hold credentials, carried safely between processes.

A :class:`StorageConfig` is part of every job spec (``pipeline.jobs``). It is built once at the
edge (the CLI's ``-S key=value`` options, or a flow parameter), resolved once on the driver, and
handed as an argument to every process that touches storage: Ray actors, Ray Train workers, a Ray
job's driver. Nothing is kept in module state, so a worker on another node gets exactly what the
driver had.

Secrets (option names containing secret, token, password, credential …) are never part of the
value's *fields*: its public ``options`` show ``"***"`` in their place, or a reference:

- ``env:NAME``: the environment variable ``NAME`` of the process that resolves the config (the
  driver: the CLI, the Prefect worker's flow run, the Ray job's driver);
- ``prefect-secret:NAME``: the Prefect Secret block ``NAME`` (resolved by ``flows``).

Literal values given in-process (the CLI's ``-S secret=…``) ride *beside* the fields, in an
attribute that ``dataclasses.asdict``, JSON, Prefect's parameter records and ``repr`` never see but
that pickling (Ray) carries. So a flow run records ``{"secret": "***"}`` while its process, and the
Ray processes it starts, hold the real value.

:meth:`StorageConfig.resolve` also captures the driver's ``AWS_*`` settings (endpoint, region,
credentials, profile) for ``s3://`` URIs, where no option sets them: a worker on a node whose
environment has none reaches the same store as the driver.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Option names whose values are credentials: s3fs ``secret``/``token``, botocore
# ``aws_secret_access_key``/``aws_session_token``, gcsfs ``token``, adlfs ``account_key``/
# ``sas_token``, passwords of HTTP/SFTP filesystems. Access key *ids* (s3fs ``key``) are
# identifiers, not secrets, and stay readable: they tell which identity was refused.
SECRET_OPTION_NAME = re.compile(r"(?i)(secret|token|passw|credential|private|account_key|sas)")
REDACTED = "***"
_REFERENCE = re.compile(r"^(env|prefect-secret):([A-Za-z_][A-Za-z0-9_.\-/]*)$")
# The driver's environment that reaches s3:// workers: name → (option path, is secret).
_AWS_ENVIRONMENT = {
    "AWS_ENDPOINT_URL_S3": (("client_kwargs", "endpoint_url"), False),
    "AWS_ENDPOINT_URL": (("client_kwargs", "endpoint_url"), False),
    "AWS_REGION": (("client_kwargs", "region_name"), False),
    "AWS_DEFAULT_REGION": (("client_kwargs", "region_name"), False),
    "AWS_PROFILE": (("profile",), False),
    "AWS_ACCESS_KEY_ID": (("key",), False),
    "AWS_SECRET_ACCESS_KEY": (("secret",), True),
    "AWS_SESSION_TOKEN": (("token",), True),
}
_CREDENTIAL_OPTIONS = ("key", "secret", "token", "anon", "profile")

Path = tuple[str, ...]
SecretLookup = Callable[[str, str], str]  # (kind, name) → value; raises KeyError when there is none


def is_reference(value: Any) -> bool:
    """Whether ``value`` names a secret (``env:NAME``, ``prefect-secret:NAME``) instead of being one."""
    return isinstance(value, str) and _REFERENCE.match(value) is not None


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["endpoint_url=http://h:9000", "anon=false"]`` → a dict, JSON-decoding values that parse
    (numbers, booleans, null, objects, lists) and keeping the rest as strings. ``client_kwargs.x=y``
    nests (``{"client_kwargs": {"x": "y"}}``); a JSON object given for a key merges with nested
    keys set on it. Raises ``ValueError`` naming the offending pair (its value masked)."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, separator, raw = pair.partition("=")
        names = [name.strip() for name in key.split(".")]
        shown = f"{key}={REDACTED}" if SECRET_OPTION_NAME.search(key) else pair
        if not separator or not all(names):
            raise ValueError(f"storage option {shown!r} is not of the form key=value (nested: a.b=value)")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = options
        *parents, leaf = names
        for depth, parent in enumerate(parents):
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                where = ".".join(names[: depth + 1])
                raise ValueError(f"storage option {shown!r}: {where!r} is already set to a value, not a group")
        if isinstance(target.get(leaf), dict) and isinstance(value, dict):
            target[leaf].update(value)
        else:
            target[leaf] = value
    return options


def _leaves(options: Mapping[str, Any], parents: Path = ()) -> list[tuple[Path, Any]]:
    found = []
    for name, value in options.items():
        if isinstance(value, Mapping):
            found += _leaves(value, (*parents, str(name)))
        else:
            found.append(((*parents, str(name)), value))
    return found


def _get(options: Mapping[str, Any], path: Path) -> Any:
    for name in path:
        if not isinstance(options, Mapping) or name not in options:
            return None
        options = options[name]
    return options


def _set(options: dict[str, Any], path: Path, value: Any) -> None:
    for name in path[:-1]:
        options = options.setdefault(name, {})
    options[path[-1]] = value


@dataclass(frozen=True)
class StorageConfig:
    """fsspec storage options of a job; see the module docstring for how secrets travel.

    ``options`` is the public form (secrets masked or referenced): safe to log, record and show.
    """

    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        public = copy.deepcopy(dict(self.options))
        secrets: dict[Path, str] = {}
        for path, value in _leaves(public):
            if SECRET_OPTION_NAME.search(path[-1]) and isinstance(value, str):
                if not is_reference(value) and value != REDACTED:
                    secrets[path] = value
                    _set(public, path, REDACTED)
        object.__setattr__(self, "options", public)
        object.__setattr__(self, "_secrets", secrets)
        object.__setattr__(self, "_environment", {})

    @classmethod
    def parse(cls, pairs: list[str] | None) -> StorageConfig:
        """From the CLI's ``-S key=value`` pairs (see :func:`parse_storage_options`)."""
        return cls(parse_storage_options(pairs))

    def _with(self, secrets: dict[Path, str], environment: dict[str, str]) -> StorageConfig:
        other = StorageConfig(self.options)
        object.__setattr__(other, "_secrets", secrets)
        object.__setattr__(other, "_environment", environment)
        return other

    # --------------------------------------------------------------------------- resolving

    def resolve(self, lookup: SecretLookup | None = None) -> StorageConfig:
        """The config with every reference replaced by its value (hidden like a literal secret) and
        the ``AWS_*`` settings of this process captured: what the driver hands to its workers.
        ``lookup(kind, name)`` answers references other than ``env:`` (``prefect-secret:``).
        Raises ``ValueError`` naming the option when a reference cannot be resolved."""
        secrets = dict(self._secrets)
        for path, value in _leaves(self.options):
            if path in secrets:
                continue
            if value == REDACTED:
                raise ValueError(
                    f"storage option {'.'.join(path)!r} was given as a literal secret to an earlier run and is not "
                    "recorded: give it as env:NAME or prefect-secret:NAME to run again from the record"
                )
            if is_reference(value):
                secrets[path] = _lookup(path, value, lookup)
        environment = {**{n: os.environ[n] for n in _AWS_ENVIRONMENT if os.environ.get(n)}, **self._environment}
        return self._with(secrets, environment)

    def fsspec_options(self, protocol: str) -> dict[str, Any]:
        """The keyword arguments for ``protocol``'s fsspec filesystem: references resolved (from
        this process's environment, if :meth:`resolve` did not), secrets revealed, and for ``s3``
        the captured ``AWS_*`` settings where no option sets them."""
        options = copy.deepcopy(self.options)
        for path, value in _leaves(self.options):
            if path in self._secrets:
                _set(options, path, self._secrets[path])
            elif value == REDACTED or is_reference(value):
                _set(options, path, _lookup(path, value, None))
        if protocol == "s3":
            self._apply_aws_environment(options)
        return options

    def _apply_aws_environment(self, options: dict[str, Any]) -> None:
        has_credentials = any(name in options for name in _CREDENTIAL_OPTIONS)
        for name, (path, _) in _AWS_ENVIRONMENT.items():
            value = self._environment.get(name)
            if value is None or _get(options, path) is not None:
                continue
            if path[-1] == "endpoint_url" and options.get("endpoint_url"):
                continue
            if path[0] in _CREDENTIAL_OPTIONS and has_credentials:
                continue  # never mix an identity given as options with one from the environment
            if name == "AWS_PROFILE" and "AWS_ACCESS_KEY_ID" in self._environment:
                continue
            _set(options, path, value)

    def secret_values(self) -> set[str]:
        """Every secret value this config can reveal: for redacting messages."""
        found = set(self._secrets.values())
        secret_names = [name for name, (_, secret) in _AWS_ENVIRONMENT.items() if secret]
        found |= {self._environment[name] for name in secret_names if name in self._environment}
        return found

    def __bool__(self) -> bool:
        return bool(self.options) or bool(self._environment)


def _lookup(path: Path, reference: str, lookup: SecretLookup | None) -> str:
    option = ".".join(path)
    if reference == REDACTED:
        raise ValueError(f"storage option {option!r} holds a masked secret ({REDACTED}) and no value")
    kind, name = _REFERENCE.match(reference).groups()
    if kind == "env":
        value = os.environ.get(name)
        if value is None:
            raise ValueError(
                f"storage option {option!r} refers to the environment variable {name}, which is not set "
                f"on {socket.gethostname()}"
            )
        return value
    if lookup is None:
        raise ValueError(f"storage option {option!r} refers to {reference!r}, which this process cannot resolve")
    try:
        return lookup(kind, name)
    except KeyError as exc:
        raise ValueError(f"storage option {option!r}: {reference!r} not found ({exc})") from None


StorageOptions = StorageConfig | Mapping[str, Any]


def fsspec_options(options: StorageOptions | None, protocol: str) -> dict[str, Any]:
    """Keyword arguments for ``protocol``'s filesystem from a :class:`StorageConfig` or a plain
    mapping of fsspec options (library use, tests)."""
    if options is None:
        return {}
    if isinstance(options, StorageConfig):
        return options.fsspec_options(protocol)
    return copy.deepcopy(dict(options))


def secret_values(options: StorageOptions | None) -> set[str]:
    """The credential values inside ``options`` (a config, or nested option mappings) and in the AWS
    credential environment variables of this process: what messages must not show."""
    found = {os.environ[name] for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN") if os.environ.get(name)}
    if isinstance(options, StorageConfig):
        return found | options.secret_values()
    for path, value in _leaves(options or {}):
        if isinstance(value, str) and SECRET_OPTION_NAME.search(path[-1]):
            found.add(value)
    return found
