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

import errno
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
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
_BUCKET_PROTOCOLS = ("s3", "gs")


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
    r"access_token|key|secret|password|credential)[^=&]*=)[^&\s]*"
)
# Option names whose values are credentials: s3fs ``secret``/``token``, botocore
# ``aws_secret_access_key``/``aws_session_token``, gcsfs ``token``, adlfs ``account_key``/
# ``sas_token``, passwords of HTTP/SFTP filesystems. Access key *ids* (s3fs ``key``) are
# identifiers, not secrets, and stay readable: they tell which identity was refused.
_SECRET_OPTION_NAME = re.compile(r"(?i)(secret|token|passw|credential|private|account_key|sas)")
_SECRET_ENVIRONMENT = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
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


def secret_values(options: StorageOptions | None) -> set[str]:
    """The credential values inside ``options`` (nested dictionaries included) and in the AWS
    credential environment variables: what :func:`redact` must remove from messages."""
    found = {os.environ[name] for name in _SECRET_ENVIRONMENT if os.environ.get(name)}
    pending: list[Mapping[str, Any]] = [options or {}]
    while pending:
        for name, value in pending.pop().items():
            if isinstance(value, Mapping):
                pending.append(value)
            elif isinstance(value, str) and _SECRET_OPTION_NAME.search(str(name)):
                found.add(value)
    return found


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


def default_storage_options() -> dict[str, dict[str, Any]]:
    """A copy of the per-protocol defaults set with :func:`set_default_storage_options`, to hand
    them to other processes (Ray actors)."""
    return {protocol: dict(options) for protocol, options in _default_options.items()}


def parse_storage_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["endpoint_url=http://h:9000", "anon=false"]`` → a dict, JSON-decoding values that parse
    (numbers, booleans, null, objects, lists) and keeping the rest as strings. ``client_kwargs.x=y``
    nests (``{"client_kwargs": {"x": "y"}}``); a JSON object given for a key merges with nested
    keys set on it. Raises ``ValueError`` naming the offending pair."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, separator, raw = pair.partition("=")
        names = [name.strip() for name in key.split(".")]
        if not separator or not all(names):
            raise ValueError(f"storage option {pair!r} is not of the form key=value (nested: a.b=value)")
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
                raise ValueError(f"storage option {pair!r}: {where!r} is already set to a value, not a group")
        if isinstance(target.get(leaf), dict) and isinstance(value, dict):
            target[leaf].update(value)
        else:
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


def with_retries(
    operation: Callable[[], T],
    *,
    uri: str,
    what: str,
    attempts: int | None = None,
    on_retry: Callable[[int, BaseException], None] | None = None,
    secrets: Iterable[str] = (),
) -> T:
    """Run ``operation``; retry transient failures with jittered exponential backoff.

    Raises :class:`StorageError` naming ``what`` and the redacted ``uri`` when the failure is
    permanent or the attempts are used up. ``secrets`` (credential values, see
    :func:`secret_values`) are removed from the message; when the underlying error's text held one,
    the error is not chained either, so that no traceback can print it.
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
            if not transient or attempt == attempts:
                raw_detail = f"{type(exc).__name__}: {exc}"
                detail = redact(raw_detail, secrets)
                suffix = f" after {attempt} attempts" if transient else ""
                error = StorageError(f"{what} {safe_uri} failed{suffix}: {detail}", uri=safe_uri, transient=transient)
                if detail != raw_detail:
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


# ----------------------------------------------------------------------------- operations


def read_bytes(uri: str, storage_options: StorageOptions | None = None) -> bytes:
    """The whole object at ``uri``."""
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: fs.cat_file(path), uri=uri, what="reading", secrets=_secrets_of(fs))


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

    with_retries(put, uri=uri, what="writing", secrets=_secrets_of(fs))


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

    return with_retries(check, uri=uri, what="checking", secrets=_secrets_of(fs))


def size(uri: str, storage_options: StorageOptions | None = None) -> int:
    fs, path = filesystem(uri, storage_options)
    return with_retries(lambda: int(fs.size(path)), uri=uri, what="sizing", secrets=_secrets_of(fs))


def list_files(
    prefix: str,
    storage_options: StorageOptions | None = None,
    *,
    recursive: bool = False,
    suffixes: tuple[str, ...] | None = None,
) -> list[str]:
    """URIs of the files under ``prefix`` (sorted). A missing prefix is an empty list; a missing
    bucket is a permanent :class:`StorageError` (a typo in a bucket name is not "no images").

    ``suffixes`` filters by name ending, case-insensitively (``(".jpg", ".png")``). Hidden and
    temporary files (names starting with ``.`` or ``_``) are left out. The URIs are spelt like
    ``prefix`` (``memory://x`` stays ``memory://x/…``, not ``memory:///x/…``).
    """
    fs, path = filesystem(prefix, storage_options)
    bucket = _bucket_of(prefix, path)

    def listing() -> list[str]:
        fs.invalidate_cache(path)
        if not fs.exists(path):
            if bucket is not None and bucket != path and not _bucket_exists(fs, bucket):
                raise FileNotFoundError(f"bucket {bucket!r} does not exist")
            return []
        if recursive:
            entries = fs.find(path, detail=True)
            names = [name for name, info in entries.items() if info.get("type") != "directory"]
        else:
            names = [e["name"] for e in fs.ls(path, detail=True) if e.get("type") != "directory"]
        return sorted(names)

    names = with_retries(listing, uri=prefix, what="listing", secrets=_secrets_of(fs))
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


def delete(uri: str, storage_options: StorageOptions | None = None, *, missing_ok: bool = True) -> None:
    fs, path = filesystem(uri, storage_options)

    def remove() -> None:
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            if not missing_ok:
                raise

    with_retries(remove, uri=uri, what="deleting", secrets=_secrets_of(fs))


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
            raise FileNotFoundError(f"bucket {bucket!r} does not exist")

    with_retries(check, uri=uri, what="opening bucket of", secrets=_secrets_of(fs))


def relative_path(uri: str, prefix: str) -> str:
    """The path of ``uri`` below ``prefix`` (``"a/b.jpg"``), compared as filesystem paths so that
    spellings of the same location (``memory://x`` / ``memory:///x``) agree."""
    _, path = filesystem(uri)
    _, root = filesystem(prefix)
    path, root = path.rstrip("/"), root.rstrip("/")
    if not path.startswith(root + "/"):
        raise ValueError(f"{redact(uri)} is not below {redact(prefix)}")
    return path[len(root) + 1 :]
