"""Object storage behind one interface: every location is a URI handled through fsspec.

Supported: local paths and ``file://``, ``s3://`` (s3fs), ``gs://`` (gcsfs, the ``gcs`` extra) and
``memory://``. S3 endpoint, region and credentials come from the usual places (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``~/.aws``, fsspec's
``FSSPEC_S3_*`` variables) and can be overridden per call with ``storage_options`` (the CLI's
``--storage-option key=value``).

Three promises, relied upon by the rest of the data plane:

- transient errors (timeouts, 5xx, throttling, connection refused/reset) are retried with
  exponential backoff and a cap; permanent ones (no such bucket or key, access denied, bad
  argument) fail at once;
- every error leaving this module is a :class:`StorageError` whose message names the URI with any
  credentials removed (:func:`redact`);
- :func:`write_bytes` is atomic: readers see the whole object or nothing. On object stores a single
  PUT (or a completed multipart upload) is atomic by itself; on a local disk we write a temporary
  file in the same folder and ``os.replace`` it into place.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

T = TypeVar("T")

StorageOptions = Mapping[str, Any]

# Retry policy, read once. Defaults ride out a ~30 s outage of the store.
RETRY_ATTEMPTS = int(os.environ.get("DETECTFLOW_STORAGE_RETRIES", "10"))
RETRY_BASE_DELAY_S = float(os.environ.get("DETECTFLOW_STORAGE_RETRY_BASE_S", "0.25"))
RETRY_MAX_DELAY_S = float(os.environ.get("DETECTFLOW_STORAGE_RETRY_MAX_S", "8"))

_default_options: dict[str, dict[str, Any]] = {}


class StorageError(OSError):
    """A storage operation failed. ``transient`` says whether it was still failing after retries
    (True) or failed permanently at once (False). The message names the redacted URI."""

    def __init__(self, message: str, *, uri: str, transient: bool):
        super().__init__(message)
        self.uri = uri
        self.transient = transient


# ----------------------------------------------------------------------------------- URIs


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<userinfo>[^@/\s]*@)")
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
    r"access_token|key|secret|password|credential)[^=&]*=)[^&]*"
)


def redact(uri: str) -> str:
    """The URI with user info (``key:secret@``) and secret-looking query values removed."""
    uri = _USERINFO.sub(r"\g<scheme>***@", str(uri))
    return _SECRET_QUERY.sub(r"\1***", uri)


def protocol_of(uri: str) -> str:
    """``'s3'``, ``'gs'``, ``'memory'``, ``'file'`` … for a URI; plain paths are ``'file'``."""
    if "://" not in uri:
        return "file"
    proto = uri.split("://", 1)[0].lower()
    return {"gcs": "gs", "s3a": "s3"}.get(proto, proto)


def normalize(uri: str | os.PathLike) -> str:
    """A canonical URI: plain local paths become absolute ``file://`` URIs, trailing slashes go."""
    uri = os.fspath(uri)
    if "://" not in uri:
        uri = "file://" + os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split("://", 1)
    rest = rest.rstrip("/") if rest not in ("", "/") else rest
    return f"{scheme}://{rest}"


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI with ``/``."""
    out = normalize(uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = out + "/" + part
    return out


def basename(uri: str) -> str:
    return normalize(uri).rstrip("/").rsplit("/", 1)[-1]


def set_default_storage_options(protocol: str, options: StorageOptions) -> None:
    """Options merged under every call's own ``storage_options`` for ``protocol`` (e.g. the CLI's
    ``--storage-option`` values)."""
    _default_options[protocol] = dict(options)


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["endpoint_url=http://h:9000", "anon=false"]`` → a dict, JSON-decoding values that parse
    (numbers, booleans, objects) and keeping the rest as strings. ``client_kwargs.x=y`` nests."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"storage option {pair!r} is not of the form key=value")
        key, raw = pair.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = options
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return options


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving ``uri`` and the path inside it."""
    uri = normalize(uri)
    protocol = protocol_of(uri)
    options = {**_default_options.get(protocol, {}), **dict(storage_options or {})}
    if protocol == "s3":
        # Listings written by other processes must be seen: never trust a cached listing.
        options.setdefault("use_listings_cache", False)
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except ImportError as exc:
        raise StorageError(
            f"no filesystem for {redact(uri)}: {exc} (for gs:// install detectflow[gcs])",
            uri=redact(uri),
            transient=False,
        ) from exc
    return fs, path


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The inverse of :func:`filesystem` for a path returned by ``fs`` (listing results)."""
    return normalize(fs.unstrip_protocol(path))


# --------------------------------------------------------------------------- retry policy

_TRANSIENT_NAMES = (
    "timeout",
    "connection",
    "endpointconnectionerror",
    "serverdisconnected",
    "clientoserror",
    "clientpayloaderror",
    "responsestreamingerror",
    "incompleteread",
    "protocolerror",
)
_TRANSIENT_MESSAGES = (
    "slowdown",
    "slow down",
    "internalerror",
    "internal error",
    "serviceunavailable",
    "service unavailable",
    "503",
    "500",
    "502",
    "504",
    "reduce your request rate",
    "connection reset",
    "connection refused",
    "connection aborted",
    "broken pipe",
    "temporarily unavailable",
    "timed out",
    "could not connect",
)
_PERMANENT_TYPES = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, TypeError)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised ``exc`` may succeed."""
    if isinstance(exc, StorageError):
        return exc.transient
    if isinstance(exc, _PERMANENT_TYPES):
        # The outermost classification wins: a missing key stays missing even when a timeout of an
        # internal retry is chained to it.
        return False
    chain: list[BaseException] = []
    cursor: BaseException | None = exc
    while cursor is not None and len(chain) < 8:
        chain.append(cursor)
        cursor = cursor.__cause__ or cursor.__context__
    for err in chain:
        name = type(err).__name__.lower()
        text = str(err).lower()
        if isinstance(err, (ConnectionError, TimeoutError)) or any(n in name for n in _TRANSIENT_NAMES):
            return True
        if any(m in text for m in _TRANSIENT_MESSAGES):
            return True
    return not isinstance(exc, _PERMANENT_TYPES) and isinstance(exc, OSError) and not isinstance(exc, FileExistsError)


def with_retries(
    operation: Callable[[], T],
    *,
    uri: str,
    what: str,
    attempts: int | None = None,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> T:
    """Run ``operation``; retry transient failures with jittered exponential backoff.

    Raises :class:`StorageError` naming ``what`` and the redacted ``uri`` when the failure is
    permanent or the attempts are used up.
    """
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    safe_uri = redact(uri)
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 — classified below, re-raised as StorageError
            transient = is_transient(exc)
            if not transient or attempt == attempts:
                detail = redact(f"{type(exc).__name__}: {exc}")
                suffix = f" after {attempt} attempts" if transient else ""
                raise StorageError(
                    f"{what} {safe_uri} failed{suffix}: {detail}", uri=safe_uri, transient=transient
                ) from exc
            delay = min(RETRY_MAX_DELAY_S, RETRY_BASE_DELAY_S * 2 ** (attempt - 1))
            delay *= 0.5 + random.random() / 2
            log.warning(
                "%s %s: transient %s (attempt %d/%d), retrying in %.2fs",
                what,
                safe_uri,
                type(exc).__name__,
                attempt,
                attempts,
                delay,
            )
            if on_retry is not None:
                on_retry(attempt, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- operations


def read_bytes(uri: str, storage_options: StorageOptions | None = None) -> bytes:
    """The whole object at ``uri``."""
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: fs.cat_file(path), uri=uri, what="reading")


def write_bytes(uri: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (whole object or nothing), creating parent folders."""
    fs, path = filesystem(uri, storage_options)

    def put() -> None:
        if isinstance(fs, LocalFileSystem):
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            fs.pipe_file(path, data)

    with_retries(put, uri=uri, what="writing")


def read_json(uri: str, storage_options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(uri, storage_options))


def write_json(uri: str, value: Any, storage_options: StorageOptions | None = None) -> None:
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True, default=str).encode(), storage_options)


def exists(uri: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)

    def check() -> bool:
        fs.invalidate_cache(path)
        return fs.exists(path)

    return with_retries(check, uri=uri, what="checking")


def size(uri: str, storage_options: StorageOptions | None = None) -> int:
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: int(fs.size(path)), uri=uri, what="sizing")


def list_files(
    prefix: str,
    storage_options: StorageOptions | None = None,
    *,
    recursive: bool = False,
    suffixes: tuple[str, ...] | None = None,
) -> list[str]:
    """URIs of the files under ``prefix`` (sorted). A missing prefix is an empty list.

    ``suffixes`` filters by name ending, case-insensitively (``(".jpg", ".png")``). Hidden and
    temporary files (names starting with ``.`` or ``_``) are left out.
    """
    fs, path = filesystem(prefix, storage_options)

    def listing() -> list[str]:
        fs.invalidate_cache(path)
        if not fs.exists(path):
            return []
        if recursive:
            entries = fs.find(path, detail=True)
            names = [name for name, info in entries.items() if info.get("type") != "directory"]
        else:
            names = [e["name"] for e in fs.ls(path, detail=True) if e.get("type") != "directory"]
        return sorted(names)

    names = with_retries(listing, uri=prefix, what="listing")
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    out = []
    for name in names:
        leaf = name.rstrip("/").rsplit("/", 1)[-1]
        if leaf.startswith((".", "_")):
            continue
        if wanted and not leaf.lower().endswith(wanted):
            continue
        out.append(to_uri(fs, name))
    return out


def delete(uri: str, storage_options: StorageOptions | None = None, *, missing_ok: bool = True) -> None:
    fs, path = filesystem(uri, storage_options)

    def remove() -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            if not missing_ok:
                raise

    with_retries(remove, uri=uri, what="deleting")


def ensure_bucket(uri: str, storage_options: StorageOptions | None = None) -> None:
    """Fail fast, before any work starts, when the bucket (or local parent) of ``uri`` is unusable.

    For object stores this checks that the bucket exists and can be listed; a missing bucket is a
    permanent :class:`StorageError` naming the URI.
    """
    fs, path = filesystem(uri, storage_options)
    if isinstance(fs, LocalFileSystem) or protocol_of(uri) == "memory":
        return
    bucket = path.split("/", 1)[0]

    def check() -> None:
        fs.invalidate_cache(bucket)
        if not fs.exists(bucket):
            raise FileNotFoundError(f"bucket {bucket!r} does not exist")
        fs.ls(bucket)

    with_retries(check, uri=uri, what="opening bucket of")


def relative_path(uri: str, prefix: str) -> str:
    """The path of ``uri`` below ``prefix`` (``"a/b.jpg"``), compared as filesystem paths so that
    spellings of the same location (``memory://x`` / ``memory:///x``) agree."""
    _, path = filesystem(uri)
    _, root = filesystem(prefix)
    path, root = path.rstrip("/"), root.rstrip("/")
    if not path.startswith(root + "/"):
        raise ValueError(f"{redact(uri)} is not below {redact(prefix)}")
    return path[len(root) + 1 :]
