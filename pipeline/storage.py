"""Object storage behind one interface: every location is a URI handled through fsspec.

Supported: local paths and ``file://``, ``s3://`` (s3fs), ``gs://`` (gcsfs, the ``gcs`` extra) and
``memory://``. S3 endpoint, region and credentials come from the usual places (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``~/.aws``, fsspec's
``FSSPEC_S3_*`` variables) and from a job's :class:`StorageConfig` (the CLI's
``--storage-option key=value``), which every function here takes as an argument: there are no
process-wide defaults, because the processes that do the work (Ray actors, Ray Train workers) are
not the process that parsed the command line.

Three promises, relied upon by the rest of the data plane:

- transient errors (timeouts, 5xx, throttling, connection refused/reset) are retried with
  exponential backoff and a cap; permanent ones (no such bucket or key, access denied, bad
  argument) fail at once;
- every error leaving this module is a :class:`StorageError` whose message names the URI with any
  credentials removed (:func:`redact`);
- :func:`write_bytes` is atomic: readers see the whole object or nothing. On object stores a single
  PUT (or a completed multipart upload) is atomic by itself; on a local disk we write a temporary
  file in the same folder and ``os.replace`` it into place.

Conditional writes (:func:`write_bytes_if_absent`, :func:`replace_bytes_if_version`,
:func:`delete_if_version`, with :func:`read_bytes_with_version`) let writers that share a store
exclude each other without any other service (``pipeline.lease``, the dataset descriptor). They keep
the three promises; a store that cannot do them is named in a warning, never silently raced.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from .storage_config import StorageConfig, StorageOptions, fsspec_options, parse_storage_options, secret_values

__all__ = ["StorageConfig", "StorageError", "StorageOptions", "parse_storage_options", "secret_values"]

log = logging.getLogger(__name__)

T = TypeVar("T")


# Retry policy, read once. Defaults ride out a ~30 s outage of the store.
RETRY_ATTEMPTS = int(os.environ.get("DETECTFLOW_STORAGE_RETRIES", "10"))
FIRST_CONTACT_ATTEMPTS = 3  # connection attempts to an object store this process never reached
_REACHED = "_detectflow_reached"
RETRY_BASE_DELAY_S = float(os.environ.get("DETECTFLOW_STORAGE_RETRY_BASE_S", "0.25"))
RETRY_MAX_DELAY_S = float(os.environ.get("DETECTFLOW_STORAGE_RETRY_MAX_S", "8"))

_BUCKET_PROTOCOLS = ("s3", "gs")
# Stores that live in one machine (or one process): storage options mean nothing to them.
_LOCAL_PROTOCOLS = ("file", "local", "memory")


class StorageError(OSError):
    """A storage operation failed. ``transient`` says whether it was still failing after retries
    (True) or failed permanently at once (False). ``reason`` is the cause in a word when one is
    known: one of :data:`REASONS`. The message names the redacted URI and the reason."""

    def __init__(self, message: str, *, uri: str, transient: bool, reason: str | None = None):
        super().__init__(message)
        self.uri = uri
        self.transient = transient
        self.reason = reason

    def __reduce__(self) -> tuple:  # keyword-only fields: pickled (Ray) errors rebuild with them
        return (_rebuild_storage_error, (str(self), self.uri, self.transient, self.reason))


def _rebuild_storage_error(message: str, uri: str, transient: bool, reason: str | None) -> StorageError:
    return StorageError(message, uri=uri, transient=transient, reason=reason)


NOT_FOUND, NO_BUCKET, ACCESS_DENIED, UNREACHABLE = "not found", "no such bucket", "access denied", "could not connect"
REASONS = (NOT_FOUND, NO_BUCKET, ACCESS_DENIED, UNREACHABLE)
_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "403"}
)


# ----------------------------------------------------------------------------------- URIs


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)(?P<userinfo>[^@/\s]*@)")
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
    r"access_token|key|secret|password|credential)[^=&]*=)[^&\s]*"
)
_MIN_SECRET_LENGTH = 4  # shorter values ("1", "ab") would blank out unrelated text


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` (a URI or an error message) with user info (``key:secret@``), secret-looking query
    values and every occurrence of the given ``secrets`` replaced by ``***``."""
    text = _USERINFO.sub(r"\g<scheme>***@", str(text))
    text = _SECRET_QUERY.sub(r"\1***", text)
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= _MIN_SECRET_LENGTH:
            text = text.replace(secret, "***")
    return text


def _userinfo_secrets(uri: str) -> set[str]:
    """The ``user:password`` parts of the URIs in ``uri``: libraries echo them without the scheme
    (``bucket name "key:secret@bucket" is invalid``), where :data:`_USERINFO` cannot see them."""
    found = set()
    for match in _USERINFO.finditer(str(uri)):
        userinfo = match["userinfo"][:-1]
        found.add(userinfo)
        found.add(userinfo.partition(":")[2])
    return {value for value in found if value}


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


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving ``uri`` and the path inside it."""
    uri = normalize(uri)
    protocol = protocol_of(uri)
    options = {} if protocol in _LOCAL_PROTOCOLS else fsspec_options(storage_options, protocol)
    if protocol == "s3":
        # Listings written by other processes must be seen: never trust a cached listing.
        options.setdefault("use_listings_cache", False)
        # One retry budget (docs/design.md): this module retries; botocore's own retries would
        # multiply every attempt by up to 5.
        config = options.setdefault("config_kwargs", {})
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except ImportError as exc:
        raise StorageError(
            f"no filesystem for {redact(uri)}: {exc} (for gs:// install detectflow[gcs])",
            uri=redact(uri),
            transient=False,
        ) from exc
    return fs, path


def retrying(fs: fsspec.AbstractFileSystem, operation: Callable[[], T], *, uri: str, what: str) -> T:
    """:func:`with_retries` for an operation on ``fs``: its credentials redacted, its endpoint named.
    An object store this process has never reached gets :data:`FIRST_CONTACT_ATTEMPTS` attempts
    to connect, not the full budget: an endpoint that never answered is most likely a wrong URL or
    a server that is not running, and the user should hear so in seconds (the mark lives on the
    fsspec instance, which fsspec caches per process and options)."""
    reached = not hasattr(fs, "call_s3") or getattr(fs, _REACHED, False)
    result = with_retries(
        operation,
        uri=uri,
        what=what,
        secrets=_secrets_of(fs),
        endpoint=endpoint_of(fs),
        connect_attempts=None if reached else FIRST_CONTACT_ATTEMPTS,
    )
    if not reached:
        setattr(fs, _REACHED, True)
    return result


def _secrets_of(fs: fsspec.AbstractFileSystem) -> set[str]:
    """Credentials the filesystem was built with (fsspec keeps its constructor's options)."""
    return secret_values(getattr(fs, "storage_options", None))


def _bucket_of(uri: str, path: str) -> str | None:
    """The bucket of an object-store path (``"bucket/key"`` → ``"bucket"``); None for file/memory."""
    return path.split("/", 1)[0] if protocol_of(uri) in _BUCKET_PROTOCOLS else None


def _bucket_exists(fs: fsspec.AbstractFileSystem, bucket: str) -> bool:
    """Whether ``bucket`` exists. Unlike s3fs's ``exists`` (which answers False when the store
    cannot be reached), an unreachable store raises, so that an outage is retried rather than
    reported as a missing bucket; 403 raises ``PermissionError``."""
    fs.invalidate_cache(bucket)
    if hasattr(fs, "call_s3"):
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            return False
        return True
    return fs.exists(bucket)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The inverse of :func:`filesystem` for a path returned by ``fs`` (listing results)."""
    return normalize(fs.unstrip_protocol(path))


# --------------------------------------------------------------------------- retry policy

# Service error codes (S3 and S3-compatible stores, GCS JSON API reasons) that mean "try again".
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "BandwidthLimitExceeded",
        "PriorRequestNotComplete",
        "OperationAborted",
        "rateLimitExceeded",
        "backendError",
    }
)
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EBUSY,  # s3fs: SlowDown, ServiceUnavailable, 503
        errno.EREMOTEIO,  # s3fs: InternalError, 500
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ENETRESET,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
    }
)
# Client-library exception types (matched by class name, so that neither botocore nor aiohttp nor
# urllib3 must be importable here): botocore ``EndpointConnectionError``, ``ConnectTimeoutError``,
# ``ReadTimeoutError``, ``ConnectionClosedError``, ``ResponseStreamingError``,
# ``IncompleteReadError``; aiohttp ``ServerDisconnectedError``, ``ServerTimeoutError``,
# ``ClientPayloadError``, ``ClientOSError``; urllib3/http.client ``ProtocolError``, ``IncompleteRead``,
# ``RemoteDisconnected``.
_TRANSIENT_TYPE_NAMES = (
    "timeout",
    "endpointconnection",
    "connectionclosed",
    "connectionerror",
    "serverdisconnected",
    "clientoserror",
    "clientpayloaderror",
    "responsestreaming",
    "incompleteread",
    "protocolerror",
    "remotedisconnected",
)
# Phrases of transient failures in the messages of exceptions that carry no code. Deliberately no
# bare status numbers: "500" also occurs in object names ("img_500.jpg: not found").
_TRANSIENT_MESSAGES = (
    "reduce your request rate",
    "slow down",
    "service unavailable",
    "internal error",
    "temporarily unavailable",
    "connection reset",
    "connection refused",
    "connection aborted",
    "broken pipe",
    "timed out",
)
_PERMANENT_TYPES = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    KeyError,
)


def _service_status(exc: BaseException) -> tuple[str | None, int | None]:
    """The service's error code and HTTP status carried by ``exc`` (botocore ``ClientError``:
    ``response``; aiohttp ``ClientResponseError``: ``status``; gcsfs ``HttpError``: ``code``)."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error") or {}
        code = str(error.get("Code") or "") or None
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if status is None and code is not None and code.isdigit():
            status = int(code)
        return code, int(status) if status is not None else None
    for attribute in ("status", "code"):
        status = getattr(exc, attribute, None)
        if isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599:
            return None, status
    return None, None


def _classify(exc: BaseException) -> bool | None:
    """True/False when ``exc`` alone says whether a retry may succeed, None when it does not."""
    if isinstance(exc, StorageError):
        return exc.transient
    code, status = _service_status(exc)
    if code is not None or status is not None:
        if code in _TRANSIENT_CODES:
            return True
        return status is not None and (status == 429 or status >= 500)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if any(name in type(exc).__name__.lower() for name in _TRANSIENT_TYPE_NAMES):
        return True
    text = str(exc).lower()
    if any(phrase in text for phrase in _TRANSIENT_MESSAGES):
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation that raised ``exc`` may succeed.

    The exception and its causes are examined outermost first; the first that tells decides:
    a service error code or HTTP status (throttling, 5xx, timeouts → transient; access denied,
    no such bucket/key, bad request → permanent), then the exception type (connection resets,
    timeouts → transient; missing files, permissions, bad arguments → permanent), then the errno,
    then well-known phrases. An ``OSError`` nothing explains is treated as transient (the retries
    are bounded); any other exception is a bug or bad input and permanent.
    """
    cursor: BaseException | None = exc
    for _ in range(8):
        if cursor is None:
            break
        verdict = _classify(cursor)
        if verdict is not None:
            return verdict
        cursor = cursor.__cause__ or cursor.__context__
    return isinstance(exc, OSError) and exc.errno is None


def failure_reason(exc: BaseException) -> str | None:
    """What went wrong, in the words of :data:`REASONS`, from ``exc`` and its causes; None when
    none of them tells."""
    cursor: BaseException | None = exc
    for _ in range(8):
        if cursor is None:
            return None
        code, status = _service_status(cursor)
        text = str(cursor).lower()
        if code == "NoSuchBucket" or "bucket does not exist" in text or "no such bucket" in text:
            return NO_BUCKET
        if code in _DENIED_CODES or status == 403 or isinstance(cursor, PermissionError):
            return ACCESS_DENIED
        if code in ("NoSuchKey", "404") or status == 404 or isinstance(cursor, FileNotFoundError):
            return NOT_FOUND
        if isinstance(cursor, (ConnectionError, TimeoutError)) or any(
            name in type(cursor).__name__.lower() for name in ("endpointconnection", "connecttimeout", "connectorerror")
        ):
            return UNREACHABLE
        cursor = cursor.__cause__ or cursor.__context__
    return None


def endpoint_of(fs: fsspec.AbstractFileSystem) -> str | None:
    """The service endpoint a filesystem talks to (an S3-compatible URL, or AWS), for messages."""
    if hasattr(fs, "call_s3"):
        kwargs = getattr(fs, "client_kwargs", None) or {}
        environment = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return getattr(fs, "endpoint_url", None) or kwargs.get("endpoint_url") or environment or "AWS S3"
    return None


def with_retries(
    operation: Callable[[], T],
    *,
    uri: str,
    what: str,
    attempts: int | None = None,
    on_retry: Callable[[int, BaseException], None] | None = None,
    secrets: Iterable[str] = (),
    endpoint: str | None = None,
    connect_attempts: int | None = None,
) -> T:
    """Run ``operation``; retry transient failures with jittered exponential backoff.

    Raises :class:`StorageError` naming ``what`` and the redacted ``uri`` when the failure is
    permanent or the attempts are used up. ``secrets`` (credential values, see
    :func:`secret_values`) are removed from the message; when the underlying error's text held one,
    the error is not chained either, so that no traceback can print it. With ``connect_attempts``,
    failing to connect that many times is final (and not transient: retrying later will not help
    an endpoint that never answered).
    """
    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    secrets = (*secrets, *_userinfo_secrets(uri))
    safe_uri = redact(uri, secrets)
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 — classified below, re-raised as StorageError
            transient = is_transient(exc)
            reason = failure_reason(exc)
            never_reached = connect_attempts is not None and reason == UNREACHABLE and attempt >= connect_attempts
            if not transient or attempt == attempts or never_reached:
                where = (what, safe_uri, endpoint, attempt)
                error, held_secret = _storage_error(exc, where, reason, secrets, never_reached)
                if held_secret:
                    raise error from None
                raise error from exc
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


def _storage_error(
    exc: Exception,
    where: tuple[str, str, str | None, int],
    reason: str | None,
    secrets: Iterable[str],
    never_reached: bool,
) -> tuple[StorageError, bool]:
    """The one-line error for a failed operation: what, where, the reason with its bucket and
    endpoint, and the service's own words only when they add something; and whether those words
    held a secret (then the error must not be chained to ``exc``). ``where``: what was done, the
    redacted URI, the endpoint and the attempt that failed last."""
    what, safe_uri, endpoint, attempt = where
    raw_detail = f"{type(exc).__name__}: {exc}"
    detail = redact(raw_detail, secrets)
    transient = is_transient(exc) and not never_reached
    bucket = _bucket_of(safe_uri, safe_uri.split("://", 1)[-1])
    words = reason or ""
    if reason in (NO_BUCKET, ACCESS_DENIED) and bucket:
        words = f"{reason} {bucket!r}" if reason == NO_BUCKET else f"{reason} to bucket {bucket!r}"
    if endpoint and reason:
        words += f" (endpoint {endpoint})"
    if never_reached:
        words += ": no request to it has succeeded; is the endpoint URL right and the server running?"
    elif reason not in (NOT_FOUND, NO_BUCKET):
        words = f"{words}: {detail}" if words else detail
    suffix = f" after {attempt} attempts" if attempt > 1 else ""
    error = StorageError(f"{what} {safe_uri} failed{suffix}: {words}", uri=safe_uri, transient=transient, reason=reason)
    return error, detail != raw_detail


# ----------------------------------------------------------------------------- operations


def read_bytes(uri: str, storage_options: StorageOptions | None = None) -> bytes:
    """The whole object at ``uri``."""
    fs, path = filesystem(uri, storage_options)
    return retrying(fs, lambda: fs.cat_file(path), uri=uri, what="reading")


def write_bytes(uri: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (whole object or nothing), creating parent folders."""
    fs, path = filesystem(uri, storage_options)

    def put() -> None:
        if isinstance(fs, LocalFileSystem):
            folder = os.path.dirname(path)
            os.makedirs(folder, exist_ok=True)
            # Hidden (list_files skips it) and within NAME_MAX however long the final name is.
            tmp = os.path.join(folder, f".{os.path.basename(path)[:200]}.tmp-{uuid.uuid4().hex}")
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

    retrying(fs, put, uri=uri, what="writing")


def read_json(uri: str, storage_options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(uri, storage_options))


def write_json(uri: str, value: Any, storage_options: StorageOptions | None = None) -> None:
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True, default=str).encode(), storage_options)


def exists(uri: str, storage_options: StorageOptions | None = None) -> bool:
    """Whether an object (or folder, or bucket) exists at ``uri``."""
    fs, path = filesystem(uri, storage_options)
    bucket = _bucket_of(uri, path)

    def check() -> bool:
        if bucket is not None and bucket == path.rstrip("/"):
            return _bucket_exists(fs, bucket)
        fs.invalidate_cache(path)
        return fs.exists(path)

    return retrying(fs, check, uri=uri, what="checking")


def size(uri: str, storage_options: StorageOptions | None = None) -> int:
    fs, path = filesystem(uri, storage_options)
    return retrying(fs, lambda: int(fs.size(path)), uri=uri, what="sizing")


def list_files(
    prefix: str,
    storage_options: StorageOptions | None = None,
    *,
    recursive: bool = False,
    suffixes: tuple[str, ...] | None = None,
    after: str | None = None,
) -> list[str]:
    """URIs of the files under ``prefix`` (sorted). A missing prefix is an empty list; a missing
    bucket is a permanent :class:`StorageError` (a typo in a bucket name is not "no images").

    ``suffixes`` filters by name ending, case-insensitively (``(".jpg", ".png")``). Hidden and
    temporary files (names starting with ``.`` or ``_``) are left out. The URIs are spelt like
    ``prefix`` (``memory://x`` stays ``memory://x/…``, not ``memory:///x/…``).

    ``after`` (a path relative to ``prefix``; the listing is then recursive): only the files whose
    relative path sorts after it, found without listing the others where the store allows: S3
    ``ListObjectsV2`` with ``StartAfter``; on local disks folders whose every path sorts before
    ``after`` are not entered. Elsewhere the full listing is filtered.
    """
    fs, path = filesystem(prefix, storage_options)
    bucket = _bucket_of(prefix, path)

    def listing() -> list[str]:
        fs.invalidate_cache(path)
        if after is not None and (hasattr(fs, "call_s3") or isinstance(fs, LocalFileSystem)):
            return _listing_after(fs, path, after)
        if not fs.exists(path):
            if bucket is not None and bucket != path and not _bucket_exists(fs, bucket):
                raise FileNotFoundError(f"bucket {bucket!r} does not exist")
            return []
        if after is not None:
            root = path.rstrip("/") + "/"
            return sorted(name for name in fs.find(path) if name[len(root) :] > after)
        if recursive:
            entries = fs.find(path, detail=True)
            names = [name for name, info in entries.items() if info.get("type") != "directory"]
        else:
            names = [e["name"] for e in fs.ls(path, detail=True) if e.get("type") != "directory"]
        return sorted(names)

    names = retrying(fs, listing, uri=prefix, what="listing")
    wanted = tuple(s.lower() for s in suffixes) if suffixes else None
    base, root = normalize(prefix), path.rstrip("/") + "/"
    out = []
    for name in names:
        leaf = name.rstrip("/").rsplit("/", 1)[-1]
        if leaf.startswith((".", "_")):
            continue
        if wanted and not leaf.lower().endswith(wanted):
            continue
        out.append(base + "/" + name[len(root) :] if name.startswith(root) else to_uri(fs, name))
    return out


def _listing_after(fs: fsspec.AbstractFileSystem, path: str, after: str) -> list[str]:
    """Paths of the files below ``path`` whose path relative to it sorts after ``after``: S3
    ``StartAfter`` (one request per 1,000 keys listed), or a walk of a local folder that skips the
    subfolders lying wholly before ``after``."""
    root = path.rstrip("/") + "/"
    if hasattr(fs, "call_s3"):
        bucket, key, _ = fs.split_path(root)
        request = {"Bucket": bucket, "Prefix": key, "StartAfter": key + after}
        names: list[str] = []
        while True:
            page = fs.call_s3("list_objects_v2", **request)
            names += [f"{bucket}/{entry['Key']}" for entry in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(names)
            request["ContinuationToken"] = page["NextContinuationToken"]
    found: list[str] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            relative = folder[len(root) :] + entry.name
            if entry.is_dir():
                below = relative + "/"
                if below > after or after.startswith(below):
                    folders.append(folder + entry.name + "/")
            elif relative > after:
                found.append(root + relative)
    return sorted(found)


def delete(uri: str, storage_options: StorageOptions | None = None, *, missing_ok: bool = True) -> None:
    fs, path = filesystem(uri, storage_options)

    def remove() -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            if not missing_ok:
                raise

    retrying(fs, remove, uri=uri, what="deleting")


def ensure_bucket(uri: str, storage_options: StorageOptions | None = None) -> None:
    """Fail fast, before any work starts, when the bucket (or local parent) of ``uri`` is unusable.

    For object stores this checks that the bucket exists and that the credentials may use it (a
    ``HEAD`` of the bucket on S3, which needs list permission); a missing bucket or a refusal is a
    permanent :class:`StorageError` naming the URI, an unreachable store is retried.
    """
    fs, path = filesystem(uri, storage_options)
    bucket = _bucket_of(uri, path)
    if bucket is None:
        return

    def check() -> None:
        if not _bucket_exists(fs, bucket):
            raise FileNotFoundError(f"no such bucket {bucket!r}")

    retrying(fs, check, uri=uri, what="opening bucket of")


def relative_path(uri: str, prefix: str) -> str:
    """The path of ``uri`` below ``prefix`` (``"a/b.jpg"``), compared as filesystem paths so that
    spellings of the same location (``memory://x`` / ``memory:///x``) agree."""
    _, path = filesystem(uri)
    _, root = filesystem(prefix)
    path, root = path.rstrip("/"), root.rstrip("/")
    if not path.startswith(root + "/"):
        raise ValueError(f"{redact(uri)} is not below {redact(prefix)}")
    return path[len(root) + 1 :]


# ----------------------------------------------------------------------- conditional writes
#
# Exclusive writers (pipeline.lease, the dataset descriptor) rest on three operations that the
# store itself makes atomic: create an object only if it is absent, replace (or delete) it only if
# it is still the version that was read. A version is an opaque string: the ETag on S3, the
# generation on GCS, a hash of the content on local disks and in memory. Each returns the new
# version (or True for a delete), or None (False) when the condition did not hold; failures are
# retried and reported like every other operation here.

CONDITIONAL_PROTOCOLS = ("s3", "gs", "file", "memory")
# memory:// lives in one process: one lock serialises its conditional operations.
_MEMORY_LOCK = threading.Lock()
_VERSION_CHARS = 32


class _ConcurrentConditional(OSError):
    """S3 answered 409 ConditionalRequestConflict (another conditional write of the key was in
    flight): transient, the retry sees the winner's object."""

    def __init__(self) -> None:
        super().__init__(errno.EAGAIN, "a concurrent conditional write of the same object")


def content_version(data: bytes) -> str:
    """The version of an object on a store without versions of its own (local disk, memory)."""
    return hashlib.sha256(data).hexdigest()[:_VERSION_CHARS]


def _service_error(exc: BaseException) -> tuple[str | None, int | None, bool]:
    """The first service error code and HTTP status in ``exc`` and its causes, and whether one of
    them is a ``FileExistsError`` (``os.link``; s3fs's translation of a failed If-None-Match)."""
    cursor: BaseException | None = exc
    exists = False
    for _ in range(8):
        if cursor is None:
            break
        exists |= isinstance(cursor, FileExistsError)
        code, status = _service_status(cursor)
        if code is not None or status is not None:
            return code, status, exists
        cursor = cursor.__cause__ or cursor.__context__
    return None, None, exists


def _precondition_failed(exc: BaseException) -> bool:
    """Whether ``exc`` says a condition did not hold: 412 PreconditionFailed (S3, GCS) or an
    existing file."""
    code, status, exists = _service_error(exc)
    return exists or code == "PreconditionFailed" or status == 412


def warn_unconditional(uri: str, why: str) -> None:
    """Say loudly that writes to ``uri`` cannot exclude each other (the store cannot, or will not,
    do conditional writes): two runs writing there at once may overwrite each other's work."""
    message = (
        f"the store of {redact(uri)} {why}: conditional writes are not possible there, so two runs "
        "writing to it at once are not kept apart (run one at a time)"
    )
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _conditional(uri: str, storage_options: StorageOptions | None, what: str, attempt: Callable[..., T]) -> T:
    """Run ``attempt(fs, path)`` with retries; a failed condition is its answer (None), not an
    error."""
    fs, path = filesystem(uri, storage_options)

    def operation() -> T:
        try:
            return attempt(fs, path)
        except Exception as exc:  # noqa: BLE001 — a failed condition is an answer; others re-raised
            if _precondition_failed(exc):
                return None  # type: ignore[return-value]
            if _service_error(exc)[0] == "ConditionalRequestConflict":
                raise _ConcurrentConditional() from exc
            raise

    return with_retries(operation, uri=uri, what=what, secrets=_secrets_of(fs), endpoint=endpoint_of(fs))


def read_bytes_with_version(uri: str, storage_options: StorageOptions | None = None) -> tuple[bytes, str]:
    """The whole object at ``uri`` and its version, read together (one request on S3)."""
    return _conditional(uri, storage_options, "reading", _read_versioned)


def version_of(uri: str, storage_options: StorageOptions | None = None) -> str | None:
    """The current version of the object at ``uri``; None when there is none."""

    def current(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
        try:
            return _read_versioned(fs, path)[1]
        except FileNotFoundError:
            return None

    return _conditional(uri, storage_options, "checking the version of", current)


def write_bytes_if_absent(uri: str, data: bytes, storage_options: StorageOptions | None = None) -> str | None:
    """Create the object at ``uri`` with ``data`` unless one exists; atomic (S3 ``If-None-Match:
    *``, GCS ``ifGenerationMatch=0``, a hard link on local disks). Returns the new object's
    version, or None when an object was already there (it is left as it was)."""
    return _conditional_write(uri, data, None, storage_options)


def replace_bytes_if_version(
    uri: str, data: bytes, version: str, storage_options: StorageOptions | None = None
) -> str | None:
    """Compare-and-swap: replace the object at ``uri`` with ``data`` only if its version is still
    ``version`` (S3 ``If-Match``, GCS ``ifGenerationMatch``, a lock file on local disks). Returns
    the new version, or None when the object changed or vanished (it is left as it is)."""
    return _conditional_write(uri, data, version, storage_options)


def delete_if_version(uri: str, version: str, storage_options: StorageOptions | None = None) -> bool:
    """Delete the object at ``uri`` only if its version is still ``version``; False when it
    changed or is gone."""

    def remove(fs: fsspec.AbstractFileSystem, path: str) -> bool:
        try:
            return _delete_versioned(fs, path, version)
        except FileNotFoundError:
            return False

    return bool(_conditional(uri, storage_options, "deleting", remove))


def _conditional_write(
    uri: str, data: bytes, version: str | None, storage_options: StorageOptions | None
) -> str | None:
    """``data`` to ``uri`` if absent (``version`` None) or still at ``version``. An attempt
    repeated after a transient failure first reads the object: the earlier attempt may have landed
    with its answer lost, and when the object holds ``data``, its version is the answer."""
    retried: list[int] = []

    def attempt(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
        if retried:
            current = _read_if_present(fs, path)
            if current is not None and current[0] == data:
                return current[1]
        retried.append(1)
        return _write_versioned(fs, path, data, version)

    return _conditional(uri, storage_options, "writing", attempt)


def _read_if_present(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str] | None:
    try:
        return _read_versioned(fs, path)
    except FileNotFoundError:
        return None


def honours_conditional_writes(prefix: str, storage_options: StorageOptions | None = None) -> bool:
    """Whether the store of ``prefix`` refuses a second create of one object (some S3-compatible
    servers ignore ``If-None-Match``). Local disks and memory do; object stores are asked with a
    hidden probe object under ``prefix`` (three requests); other stores cannot. A store that does
    not is named in a warning."""
    protocol = protocol_of(prefix)
    if protocol not in CONDITIONAL_PROTOCOLS:
        warn_unconditional(prefix, f"({protocol}://) has no conditional writes that detectflow knows")
        return False
    if protocol in _LOCAL_PROTOCOLS:
        return True
    probe = join(prefix, f".conditional-probe-{uuid.uuid4().hex}")
    try:
        first = write_bytes_if_absent(probe, b"1", storage_options)
        second = write_bytes_if_absent(probe, b"2", storage_options)
    finally:
        delete(probe, storage_options)
    if first is not None and second is None:
        return True
    warn_unconditional(
        prefix, f"(endpoint {_endpoint_in_use(filesystem(prefix, storage_options)[0])}) ignores If-None-Match"
    )
    return False


def _endpoint_in_use(fs: fsspec.AbstractFileSystem) -> str | None:
    """The endpoint the filesystem's client talks to (also one set by ``AWS_ENDPOINT_URL``)."""
    client = getattr(fs, "s3", None)
    return getattr(getattr(client, "meta", None), "endpoint_url", None) or endpoint_of(fs)


# Per-store implementations of the three operations; each raises FileNotFoundError for a missing
# object (reads) and returns None / False for a condition that did not hold.


def _is_gcs(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return "gs" in protocols or "gcs" in protocols


def _read_versioned(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str]:
    if hasattr(fs, "call_s3"):
        return _s3_read(fs, path)
    if _is_gcs(fs):
        return _gcs_read(fs, path)
    if isinstance(fs, LocalFileSystem):
        with open(path, "rb") as handle:
            data = handle.read()
        return data, content_version(data)
    with _MEMORY_LOCK:
        data = fs.cat_file(path)
    return data, content_version(data)


def _write_versioned(fs: fsspec.AbstractFileSystem, path: str, data: bytes, version: str | None) -> str | None:
    if hasattr(fs, "call_s3"):
        return _s3_write(fs, path, data, version)
    if _is_gcs(fs):
        return _gcs_write(fs, path, data, version)
    if isinstance(fs, LocalFileSystem):
        return _local_create(path, data) if version is None else _local_replace(path, data, version)
    return _checked_write(fs, path, data, version)


def _delete_versioned(fs: fsspec.AbstractFileSystem, path: str, version: str) -> bool:
    if hasattr(fs, "call_s3"):
        return _s3_delete(fs, path, version)
    if _is_gcs(fs):
        bucket, key, _ = fs.split_path(path)
        fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
        fs.invalidate_cache(path)
        return True
    if isinstance(fs, LocalFileSystem):
        with _local_lock(path):
            if _local_version(path) != version:
                return False
            os.unlink(path)
            return True
    return _checked_delete(fs, path, version)


# S3 (and S3-compatible stores that honour If-None-Match / If-Match, as AWS, MinIO, R2, SeaweedFS do)


def _s3_read(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str]:
    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await response["Body"].read(), response["ETag"]
        finally:
            response["Body"].close()

    return fsspec.asyn.sync(fs.loop, get)


def _s3_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes, version: str | None) -> str:
    bucket, key, _ = fs.split_path(path)
    condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
    try:
        response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    finally:
        fs.invalidate_cache(path)
    return response["ETag"]


def _s3_delete(fs: fsspec.AbstractFileSystem, path: str, version: str) -> bool:
    """``DeleteObject`` with ``If-Match``; where the store does not implement that (501), the
    version is compared first (a small window in which a newer version could be deleted)."""
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
    except Exception as exc:  # noqa: BLE001 — only "not implemented" is handled here
        if _service_error(exc)[1] != 501:
            raise
        if _s3_read(fs, path)[1] != version:
            return False
        fs.call_s3("delete_object", Bucket=bucket, Key=key)
    finally:
        fs.invalidate_cache(path)
    return True


# GCS through gcsfs's request helper (JSON API preconditions). Not exercised by the test suite:
# there is no GCS server here.


def _gcs_read(fs: fsspec.AbstractFileSystem, path: str) -> tuple[bytes, str]:
    """The object and its generation: the generation is read before and after the bytes and must
    agree (generations only grow, so equal ones mean the bytes are that generation's)."""
    for _ in range(5):
        fs.invalidate_cache(path)
        before = str(fs.info(path)["generation"])
        data = fs.cat_file(path)
        fs.invalidate_cache(path)
        if str(fs.info(path)["generation"]) == before:
            return data, before
    raise _ConcurrentConditional()


def _gcs_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes, version: str | None) -> str:
    bucket, key, _ = fs.split_path(path)
    out = fs.call(
        "POST",
        f"{fs._location}/upload/storage/v1/b/{quote(bucket, safe='')}/o",
        uploadType="media",
        name=key,
        ifGenerationMatch="0" if version is None else version,
        headers={"Content-Type": "application/octet-stream"},
        data=data,
        json_out=True,
    )
    fs.invalidate_cache(path)
    return str(out["generation"])


# Local disks: create = a hard link of a complete temporary file (fails if the name exists);
# replace and delete = compare and act under an exclusive flock of a hidden sidecar lock file.


def _local_temp(path: str, data: bytes) -> str:
    """A complete, synced, hidden temporary file beside ``path`` holding ``data``."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)[:200]}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return tmp


def _local_create(path: str, data: bytes) -> str:
    tmp = _local_temp(path, data)
    try:
        os.link(tmp, path)  # FileExistsError when the name is taken: the condition failed
    finally:
        os.unlink(tmp)
    return content_version(data)


@contextmanager
def _local_lock(path: str) -> Iterator[None]:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f".{os.path.basename(path)[:200]}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _local_version(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return content_version(handle.read())
    except FileNotFoundError:
        return None


def _local_replace(path: str, data: bytes, version: str) -> str | None:
    with _local_lock(path):
        if _local_version(path) != version:
            return None
        tmp = _local_temp(path, data)
        try:
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return content_version(data)


# memory:// (one process: under the lock) and, with a warning, stores without conditional writes.


def _checked_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes, version: str | None) -> str | None:
    if not isinstance(fs, MemoryFileSystem):
        warn_unconditional(fs.unstrip_protocol(path), "cannot do conditional writes")
    with _MEMORY_LOCK:
        try:
            current: str | None = content_version(fs.cat_file(path))
        except FileNotFoundError:
            current = None
        if current != version:
            return None
        fs.pipe_file(path, data)
    return content_version(data)


def _checked_delete(fs: fsspec.AbstractFileSystem, path: str, version: str) -> bool:
    if not isinstance(fs, MemoryFileSystem):
        warn_unconditional(fs.unstrip_protocol(path), "cannot do conditional deletes")
    with _MEMORY_LOCK:
        if content_version(fs.cat_file(path)) != version:
            return False
        fs.rm(path)
    return True
