"""The Ray connection, shared by inference and training.

:func:`connect` joins the cluster a job names (``ClusterSpec.ray_address``, else ``RAY_ADDRESS`` —
also set inside a Ray job —, else a new local cluster) and describes it; :func:`check_locations`
refuses, before any work, locations that the cluster's workers cannot share: a local path read or
written on a cluster of several nodes names a different disk on each node, and ``memory://`` lives
in one process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from . import storage
from .jobs import ClusterSpec


@dataclass(frozen=True)
class ClusterInfo:
    nodes: int  # alive nodes
    cpus: int
    gpus: int


def connect(cluster: ClusterSpec) -> ClusterInfo:
    """Connect this process to the job's Ray cluster (once) and describe it."""
    import ray

    if not ray.is_initialized():
        address = cluster.ray_address or os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address or None,
            include_dashboard=False if not address else None,
            log_to_driver=cluster.worker_logs,
            logging_level=logging.WARNING,
        )
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return ClusterInfo(nodes=nodes, cpus=int(resources.get("CPU", 0)), gpus=int(resources.get("GPU", 0)))


def disconnect() -> None:
    """Leave Ray if this process joined it: a local cluster this process started stops with it
    (its processes, the agents its raylet started included), a remote one keeps running."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def check_locations(uris: list[str], cluster: ClusterSpec, info: ClusterInfo) -> None:
    """Raise ``ValueError`` for a location the cluster's worker processes cannot all reach."""
    for uri in uris:
        protocol = storage.protocol_of(uri)
        if protocol == "memory":
            raise ValueError(
                f"{uri} is an in-memory location: it exists in one process only, and Ray workers run in others. "
                "Use object storage (s3://, gs://) or a local path."
            )
        if protocol in ("file", "local") and info.nodes > 1 and not cluster.shared_filesystem:
            raise ValueError(
                f"{storage.redact(uri)} is a local path, but the Ray cluster has {info.nodes} nodes: each node would "
                "read and write its own disk. Use object storage (s3://, gs://), or pass --shared-fs if this path "
                "is on a filesystem that every node mounts (NFS, Lustre, EFS)."
            )
