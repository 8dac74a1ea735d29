"""Room for a job's engine workers: one placement group per job.

A job waits (queued) until Ray places its placement group, one bundle per worker, on the cluster's free
resources: online replicas and other jobs keep what they hold, and Ray says when room frees up (no
polling). The workers then run inside it, so no later job or replica takes their room meanwhile. Only a
job that no node set could ever hold (more workers than the cluster's nodes fit) is refused.
Every function here blocks on Ray's control plane: the registry calls them from a thread.
"""

from __future__ import annotations

import math

import ray
from ray.util.placement_group import (
    PlacementGroup,
    get_placement_group,
    placement_group,
    remove_placement_group,
)

from deployments.batch.config import BatchSettings
from engine.errors import InvalidRequestError

GROUP_PREFIX = "llmserve-batch-"


def worker_bundle(settings: BatchSettings) -> dict[str, float]:
    """What one engine worker reserves."""
    bundle = {"CPU": settings.worker_num_cpus}
    if settings.worker_num_gpus:
        bundle["GPU"] = settings.worker_num_gpus
    return bundle


def num_placeable(nodes: list[dict], bundle: dict[str, float]) -> int:
    """How many workers the alive `nodes` (ray.nodes()) hold when nothing else runs."""
    total = 0
    for node in nodes:
        if node.get("Alive"):
            resources = node.get("Resources", {})
            total += min(math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items())
    return total


def check_can_ever_run(num_workers: int, settings: BatchSettings) -> None:
    """400 when the cluster's nodes could never hold `num_workers` workers at once."""
    bundle = worker_bundle(settings)
    most = num_placeable(ray.nodes(), bundle)
    if num_workers > most:
        wanted = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
        raise InvalidRequestError(
            f"data_parallelism: {num_workers} workers of {wanted} each (batch.worker_num_cpus, "
            f"batch.worker_num_gpus) can never run on this cluster: its nodes hold at most {most} "
            "such workers when nothing else runs"
        )


def reserve(job_id: str, num_workers: int, settings: BatchSettings) -> PlacementGroup:
    """Ask for the job's room; `ready()` on the result resolves once Ray placed every worker's bundle.

    Detached and named after the job, so a registry that restarts finds and removes a leftover one."""
    return placement_group(
        [worker_bundle(settings)] * num_workers,
        strategy="PACK",
        name=GROUP_PREFIX + job_id,
        lifetime="detached",
    )


def release(job_id: str) -> None:
    """Remove the job's placement group, if there is one (its workers die with it)."""
    try:
        group = get_placement_group(GROUP_PREFIX + job_id)
    except ValueError:
        return
    remove_placement_group(group)
