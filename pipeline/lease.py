"""Leases: one writer at a time for an output or a dataset, on nothing but the object store.

A lease is a small JSON object (``OUT_URI/_lease.json``, ``DATA_URI/_lease.json``) naming its
holder::

    {"run_id", "host", "pid", "what", "started_at", "renewed_at", "expires_at", "ttl_s", "machine"}

- **acquire**: create the object only if it is absent (:func:`storage.write_bytes_if_absent`). If
  it exists and has expired (now > ``expires_at``), or its holder ran on this machine and its
  process is gone (a crashed run restarted by hand), take it over with a compare-and-swap on the
  version that was read (a warning names the dead holder); of two runs taking over at once, one
  wins. If it is alive, wait (polling, up to ``wait_s``) or raise :class:`LeaseHeld` naming the
  holder.
- **heartbeat**: a daemon thread renews the lease (compare-and-swap on its own version) every
  ``ttl_s / 3``. A renewal that finds the lease changed or gone marks it **lost**:
  :attr:`Lease.lost` is set, and :meth:`Lease.check` / :meth:`Lease.verify` (called by the work at
  each shard boundary) raise :class:`LeaseLost`, so no more is written. A renewal that cannot reach
  the store is tried again; the first that gets through decides (while the store is unreachable the
  work cannot write either, and a run that took over meanwhile has changed the lease's version).
- **release**: delete the object only if it is still this holder's version.

A run killed with SIGKILL leaves its lease behind: it blocks the next run at most ``ttl_s`` (default
:data:`DEFAULT_TTL_S`), and not at all on the same machine (same host, boot and PID namespace:
``machine``), where a missing process is seen at once. Times are wall-clock UTC (the holders may be
on different machines): clocks may disagree by up to about ``ttl_s / 3`` without harm, because a
live holder's expiry is always at least ``2 * ttl_s / 3`` ahead of its own clock. A lease excludes
honest writers; it is not a fence: a holder frozen for longer than ``ttl_s`` may write once more
before its heartbeat notices the loss, which is why the dataset descriptor is also updated by
compare-and-swap.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from . import storage
from .storage import StorageOptions

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
DEFAULT_TTL_S = 60.0
RENEWALS_PER_TTL = 3


class LeaseHeld(ValueError):
    """Another live run holds the lease; ``holder`` says who."""

    def __init__(self, uri: str, holder: Holder):
        self.uri, self.holder = uri, holder
        super().__init__(
            f"{self.summary()}. Wait for it (--wait-for-lease SECONDS), or if that run is dead: its lease "
            f"expires at {holder.expires_at}, after which the next run takes over"
        )

    def __reduce__(self) -> tuple:  # pickled (Prefect states, Ray) errors rebuild with their holder
        return (LeaseHeld, (self.uri, self.holder))

    def summary(self) -> str:
        holder = self.holder
        return (
            f"{storage.redact(self.uri)} is in use by run {holder.run_id} ({holder.what}) on host {holder.host} "
            f"(pid {holder.pid}), started {holder.started_at}, last renewed {holder.renewed_at}"
        )


class LeaseLost(ValueError):
    """This run's lease was taken over (or removed) by another run: it must stop writing."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease and until when (ISO 8601 UTC times)."""

    run_id: str
    host: str
    pid: int
    what: str
    started_at: str
    renewed_at: str
    expires_at: str
    ttl_s: float
    machine: str = ""  # host, boot and PID namespace: where ``pid`` means this process (:func:`machine_id`)

    @classmethod
    def parse(cls, data: bytes, uri: str) -> Holder:
        try:
            payload = json.loads(data)
            fields = [name for name in cls.__dataclass_fields__ if name != "machine"]
            return cls(**{name: payload[name] for name in fields}, machine=str(payload.get("machine", "")))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(
                f"{storage.redact(uri)} is not a detectflow lease ({exc}); if no run is using this location, delete it"
            ) from exc

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    def expired(self, now: float) -> bool:
        return now > _parse_time(self.expires_at)

    def process_gone(self) -> bool:
        """Whether the holder ran on this machine (same host, boot, PID namespace) and its process
        no longer exists: a crashed run, whose lease need not be waited out. A reused pid reads as
        alive (the safe side)."""
        if not self.machine or self.machine != machine_id():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, owned by another user
            return False
        return False


def machine_id() -> str:
    """This host, its boot and this PID namespace (Linux); empty where they cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def lease_uri(root_uri: str) -> str:
    """The lease object of an output or a dataset: ``ROOT/_lease.json``."""
    return storage.join(root_uri, LEASE_NAME)


class Lease:
    """A lease on ``uri`` for ``run_id`` doing ``what`` (see the module docstring). Use as a
    context manager (acquire on entry, release on exit, also on error), or call :meth:`acquire`
    and :meth:`release`. ``poll_s``: how often a waiting acquirer looks again (default
    ``ttl_s / 10``, within 0.2–2 s: one small read per poll)."""

    def __init__(
        self,
        uri: str,
        *,
        run_id: str,
        what: str,
        ttl_s: float = DEFAULT_TTL_S,
        wait_s: float = 0.0,
        storage_options: StorageOptions | None = None,
        poll_s: float | None = None,
    ):
        if ttl_s <= 0 or wait_s < 0:
            raise ValueError(f"a lease needs ttl_s > 0 and wait_s ≥ 0, not {ttl_s} and {wait_s}")
        self.uri = storage.normalize(uri)
        self.run_id, self.what = run_id, what
        self.ttl_s, self.wait_s = float(ttl_s), float(wait_s)
        self.poll_s = poll_s if poll_s is not None else min(2.0, max(0.2, ttl_s / 10))
        self.storage_options = storage_options
        self.lost = threading.Event()
        self.lost_reason = ""
        self.holder: Holder | None = None
        self.version: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._lock = threading.Lock()  # the heartbeat and release never write at once

    # ------------------------------------------------------------------------ acquire

    def acquire(self) -> Lease:
        """Take the lease, waiting up to ``wait_s`` for a live holder; :class:`LeaseHeld` after."""
        deadline = time.monotonic() + self.wait_s
        started = time.time()
        storage.ensure_bucket(self.uri, self.storage_options)  # a missing bucket is named as such
        waiting = False
        while (holder := self._try_acquire(started)) is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LeaseHeld(self.uri, holder)
            if not waiting:
                log.warning("%s; waiting up to %.0f s", LeaseHeld(self.uri, holder).summary(), self.wait_s)
                waiting = True
            until_expiry = _parse_time(holder.expires_at) - time.time() + 0.05
            time.sleep(max(0.05, min(self.poll_s, left, until_expiry)))
        if waiting:
            log.warning("acquired %s after waiting %.1f s", storage.redact(self.uri), time.time() - started)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._renew_loop, name=f"lease-{self.run_id}", daemon=True)
        self._heartbeat.start()
        try:  # a store that ignores the conditions is named (a warning), once the lease is ours
            storage.honours_conditional_writes(self.uri.rsplit("/", 1)[0], self.storage_options)
        except BaseException:
            self.release()
            raise
        return self

    def _try_acquire(self, started: float) -> Holder | None:
        """Create the lease, or take it over if expired: None when it is now ours, else its live
        holder. Losing a race (released, or taken over by another run, in between) tries again."""
        while True:
            mine = self._holder(started)
            version = storage.write_bytes_if_absent(self.uri, mine.encode(), self.storage_options)
            if version is None:
                try:
                    data, current = storage.read_bytes_with_version(self.uri, self.storage_options)
                except storage.StorageError as exc:
                    if exc.reason == storage.NOT_FOUND:  # released in between
                        continue
                    raise
                holder = Holder.parse(data, self.uri)
                gone = holder.process_gone()
                if not gone and not holder.expired(time.time()):
                    return holder
                version = storage.replace_bytes_if_version(self.uri, mine.encode(), current, self.storage_options)
                if version is None:  # another run took it over first
                    continue
                log.warning(
                    "took over the lease %s of run %s (%s) on host %s (pid %s): %s",
                    storage.redact(self.uri),
                    holder.run_id,
                    holder.what,
                    holder.host,
                    holder.pid,
                    "its process is gone" if gone else f"it expired at {holder.expires_at}",
                )
            self.holder, self.version = mine, version
            return None

    def _holder(self, started: float, previous: Holder | None = None) -> Holder:
        now = time.time()
        return Holder(
            run_id=self.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            what=self.what,
            started_at=previous.started_at if previous else _iso(started),
            renewed_at=_iso(now),
            expires_at=_iso(now + self.ttl_s),
            ttl_s=self.ttl_s,
            machine=machine_id(),
        )

    # -------------------------------------------------------------------------- renew

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / RENEWALS_PER_TTL):
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 — the store is failing: the next renewal that gets through decides
                log.warning(
                    "could not renew the lease %s (expires %s): %s",
                    storage.redact(self.uri),
                    self.holder.expires_at,
                    exc,
                )
            if self.lost.is_set():
                return

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now (compare-and-swap on its version); marks it lost
        when someone else holds it now."""
        with self._lock:
            if self.lost.is_set() or self.version is None:
                return
            renewed = self._holder(time.time(), self.holder)
            version = storage.replace_bytes_if_version(self.uri, renewed.encode(), self.version, self.storage_options)
            if version is not None:
                self.holder, self.version = renewed, version
                return
        self._lose(self._taken_by())

    def _taken_by(self) -> str:
        try:
            other = Holder.parse(storage.read_bytes(self.uri, self.storage_options), self.uri)
        except (storage.StorageError, ValueError) as exc:
            return f"it was removed or replaced ({exc})"
        return f"run {other.run_id} ({other.what}) on host {other.host} took it over at {other.started_at}"

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()
        log.error("lost the lease %s: %s", storage.redact(self.uri), reason)

    # --------------------------------------------------------------------- the work's checks

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the heartbeat found the lease lost (cheap: no request)."""
        if self.lost.is_set():
            raise LeaseLost(
                f"lease lost: {storage.redact(self.uri)} is no longer held by run {self.run_id}: "
                f"{self.lost_reason}; stopped before writing more"
            )

    def verify(self) -> None:
        """:meth:`check`, then read the lease object: raise :class:`LeaseLost` unless it is still
        this holder's version (one request; before a commit point)."""
        self.check()
        with self._lock:
            if storage.version_of(self.uri, self.storage_options) != self.version and not self.lost.is_set():
                self._lose(self._taken_by())
        self.check()

    # ------------------------------------------------------------------------ release

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours. A lease that cannot be deleted
        (the store is failing) is left to expire: a release never fails the run."""
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        with self._lock:
            if self.version is None or self.lost.is_set():
                return
            try:
                if not storage.delete_if_version(self.uri, self.version, self.storage_options):
                    log.warning("the lease %s was no longer ours when released", storage.redact(self.uri))
            except storage.StorageError as exc:
                log.warning("could not delete the lease (it expires at %s): %s", self.holder.expires_at, exc)
            self.version = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
