"""What the endpoint controller and the ingress replicas pass each other: small typed values."""

from __future__ import annotations

from dataclasses import dataclass

from deployments.config import EndpointSettings
from deployments.model_server import EngineFactory


@dataclass(frozen=True, slots=True)
class Attachment:
    """An ingress app as the controller knows it: where its records live and how to deploy for it."""

    ingress_app: str
    state_root: str
    settings: EndpointSettings
    engine_factory: EngineFactory | None = None  # the app's own (tests: a fake engine); None = real


@dataclass(frozen=True, slots=True)
class RouteEntry:
    """What routing needs of one runtime endpoint."""

    app_name: str
    deployment_name: str
    is_serving: bool
    status: str
    status_reason: str | None
    replica_wait_timeout_s: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every runtime endpoint of an app at `version` = (controller start in ns, change count)."""

    version: tuple[int, int]
    routes: dict[str, RouteEntry]


class AppNotAttachedError(Exception):
    """The controller does not know this ingress app (it restarted since): attach again, then retry."""
