"""Serve's applications and their deployments' replica states: what `serve.status()` says, for ~1/10 its CPU.

`serve.status()` rebuilds Serve's pydantic details of every application, and each deployment config in
them pickles Serve's request-router class by value: ~30 ms of the caller's CPU a call with one app of
two deployments (Ray 2.60, AMD EPYC Zen 3, 2026-12-06), more with every deployment, and not thread-safe
(deployments/endpoints/deployer.py). The endpoint controller asks every second while a change is
pending. The Serve controller's own details (what `serve status` prints) carry the same fields and cost
the caller ~1 ms: this module reads those (tests/deployments/test_serve_status.py checks that both agree).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from ray.serve.context import _get_global_client


@dataclass(frozen=True, slots=True)
class DeploymentStatus:
    status: str  # DeploymentStatus: UPDATING, HEALTHY, UNHEALTHY, DEPLOY_FAILED, ...
    message: str
    replica_states: dict[str, int]  # replicas by ReplicaState ("RUNNING": 1, "STARTING": 2, ...)


@dataclass(frozen=True, slots=True)
class ApplicationStatus:
    status: str  # ApplicationStatus: DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING, ...
    message: str
    deployments: dict[str, DeploymentStatus]


def applications() -> dict[str, ApplicationStatus]:
    """Every application Serve has, as `serve.status().applications` gives it; {} before Serve starts."""
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}
    details = client.get_serve_details()
    return {name: _application(app) for name, app in details.get("applications", {}).items()}


def _application(app: dict[str, Any]) -> ApplicationStatus:
    deployments = {
        name: DeploymentStatus(
            status=_value(deployment.get("status")),
            message=deployment.get("message") or "",
            replica_states=dict(Counter(_value(r.get("state")) for r in deployment.get("replicas", ()))),
        )
        for name, deployment in app.get("deployments", {}).items()
    }
    return ApplicationStatus(_value(app.get("status")), app.get("message") or "", deployments)


def _value(status: object) -> str:
    """One of Serve's status enums (or its JSON form) as its plain value: "RUNNING"."""
    return str(getattr(status, "value", status))
