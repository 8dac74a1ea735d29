"""Readiness of the served models, as /readyz reports it.

A ModelServer replica answers `ready()` only once its constructor (download, conversion, weight
loading) has returned: until then Serve holds the call, so a probe that times out means "loading".
"""

import asyncio
from collections.abc import Mapping
from typing import Any

from ray.serve.handle import DeploymentHandle

READY, LOADING, UNAVAILABLE = "ready", "loading", "unavailable"


async def probe_models(handles: Mapping[str, DeploymentHandle], timeout_s: float) -> dict[str, str]:
    """Each model's state: ready, loading (no answer within `timeout_s`) or unavailable (an error)."""
    names = sorted(handles)
    probes = [asyncio.wait_for(handles[n].ready.remote(), timeout_s) for n in names]
    results = await asyncio.gather(*probes, return_exceptions=True)
    return {name: model_state(result) for name, result in zip(names, results, strict=True)}


def model_state(result: Any) -> str:
    if result is True:
        return READY
    if isinstance(result, TimeoutError):
        return LOADING
    return UNAVAILABLE


def readiness(states: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 `{"status": "ok", ...}` when all are ready, else 503 naming each state."""
    if all(s == READY for s in states.values()):
        return 200, {"status": "ok", "models": dict(states)}
    status = LOADING if LOADING in states.values() else UNAVAILABLE
    waiting = ", ".join(f"{n} ({s})" for n, s in states.items() if s != READY)
    return 503, {"status": status, "models": dict(states), "detail": f"models not ready: {waiting}"}
