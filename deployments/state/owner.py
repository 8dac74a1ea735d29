"""The one owner of a kind of state: a detached, named, restartable Ray actor that follows code upgrades.

Every ingress replica (and every restarted one) finds the same owner by name. The owner restarts
after a crash (`max_restarts=-1`) and rebuilds its memory from its `RecordStore`. An owner started by
older code is replaced: `owner()` compares the running actor's `code_version()` with this process's
and, when they differ, kills it and starts a new one, which reads the same records.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import ray

logger = logging.getLogger("ray")

NAMESPACE = "llmserve"
_PACKAGES = ("deployments", "engine", "model_zoo")
_START_TIMEOUT_S = 30.0


@functools.cache
def code_version() -> str:
    """A digest of this installation's Python sources: another release or an edit gives another one."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class VersionedOwner:
    """Base of owner actors: reports the code version it runs."""

    def code_version(self) -> str:
        return code_version()


def owner(cls: type, name: str, *args: Any, **options: Any) -> ray.actor.ActorHandle:
    """The running owner actor `name` of this code version, started (or replaced) when needed.

    Blocks on Ray's control plane: call it from a thread (`owner_async`) on a serving event loop.
    """
    deadline = time.monotonic() + _START_TIMEOUT_S
    while True:
        handle = _existing(name)
        if handle is not None:
            try:
                running = ray.get(handle.code_version.remote(), timeout=_START_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                running = None  # dying, or killed by another replica that is replacing it
            if running == code_version():
                return handle
            if running is not None:
                logger.info("replacing the %s actor (code %s -> %s)", name, running, code_version())
                ray.kill(handle, no_restart=True)
        try:
            return (
                ray.remote(cls)
                .options(
                    name=name,
                    namespace=NAMESPACE,
                    lifetime="detached",
                    max_restarts=-1,
                    num_cpus=0,
                    **options,
                )
                .remote(*args)
            )
        except ValueError:  # the name is still held by the actor being killed, or another replica won
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def owner_async(cls: type, name: str, *args: Any, **options: Any) -> ray.actor.ActorHandle:
    return await asyncio.to_thread(owner, cls, name, *args, **options)


def _existing(name: str) -> ray.actor.ActorHandle | None:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None
