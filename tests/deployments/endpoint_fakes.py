"""In-process stand-ins for the endpoint tests without a cluster: Serve's calls and the controller client."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from deployments.config import EndpointSettings
from deployments.endpoints import deployer
from deployments.endpoints.controller import EndpointController
from deployments.endpoints.deployer import AppState
from deployments.endpoints.service import EndpointService
from deployments.endpoints.snapshot import Attachment
from deployments.endpoints.wire import CreateLLMEndpointRequest

INGRESS_APP = "app"


class FakeServe:
    """The deployer's calls, recorded; `apps` is what serve.status() would say. `hold` pauses the
    placement check (a worker thread) until released, so a test can land a call inside it."""

    def __init__(self) -> None:
        self.apps: dict[str, AppState] = {}
        self.start_ingress()
        self.deployed: list[tuple[str, dict]] = []
        self.deleted: list[str] = []
        self.unplaceable_reason: str | None = None
        self.placement_asks: list[tuple[int, int | None]] = []  # (min_replicas, per_node) of each check
        self.hold: threading.Event | None = None
        self.held = threading.Event()

    def deploy(self, app_name, deployment_name, config, settings, engine_factory=None) -> None:
        self.deployed.append((app_name, config.deployment.autoscaling_config))
        self.apps[app_name] = AppState("DEPLOYING", "", 0, 1, (deployment_name,))

    def delete(self, app_name) -> None:
        self.deleted.append(app_name)
        self.apps.pop(app_name, None)

    def states(self, app_names=None):
        return {n: s for n, s in self.apps.items() if app_names is None or n in app_names}

    def unplaceable(self, resources, min_replicas=1, per_node=None):
        self.placement_asks.append((min_replicas, per_node))
        if self.hold is not None:
            self.held.set()
            self.hold.wait(10)
        return self.unplaceable_reason

    def handle(self, app_name, deployment_name):
        return FakeHandle(app_name)

    def start_ingress(self) -> None:
        self.apps[INGRESS_APP] = AppState("RUNNING", "", 1, 0, ("Ingress",))

    def stop_all(self) -> None:
        """serve shutdown, or a stopped cluster: no application at all."""
        self.apps.clear()

    def endpoint_apps(self) -> set[str]:
        return set(self.apps) - {INGRESS_APP}

    def run(self, name: str) -> None:
        """Serve reports the endpoint's application RUNNING with one replica."""
        self.apps[f"{INGRESS_APP}.{name}"] = AppState("RUNNING", "", 1, 0, (f"ModelServer:{name}",))


class FakeHandle:
    def __init__(self, app_name: str) -> None:
        self.app_name = app_name

    def options(self, **kwargs):
        return self


class Clock:
    """The controller's clock, moved by the test (start timeouts and the settle delay)."""

    def __init__(self) -> None:
        self.now_s = 1_000_000.0

    def __call__(self) -> float:
        return self.now_s


class LocalClient:
    """`ControllerClient` over an in-process `EndpointController`."""

    def __init__(self, controller: EndpointController, attachment: Attachment) -> None:
        self.controller, self.attachment, self.num_calls = controller, attachment, 0

    def attach_blocking(self):
        raise NotImplementedError("tests attach with `await service.attach()`")

    async def attach(self):
        return await self.controller.attach(self.attachment)

    async def changes(self, version):
        return await self.controller.changes(INGRESS_APP, version, timeout_s=0.05)

    async def create(self, request):
        return await self.controller.create(INGRESS_APP, request)

    async def update(self, name, request):
        return await self.controller.update(INGRESS_APP, name, request)

    async def delete(self, name):
        return await self.controller.delete(INGRESS_APP, name)

    async def view(self, name):
        return await self.controller.view(INGRESS_APP, name)

    async def views(self):
        return await self.controller.views(INGRESS_APP)


@pytest.fixture
def serve_fake(monkeypatch: pytest.MonkeyPatch) -> FakeServe:
    fake = FakeServe()
    for name in ("deploy", "delete", "states", "unplaceable", "handle"):
        monkeypatch.setattr(deployer, name, getattr(fake, name))
    return fake


def make_controller(clock: Clock | None = None) -> EndpointController:
    """A controller whose watcher stays idle: tests settle with `watch_once()`."""
    return EndpointController(poll_s=3600, idle_poll_s=3600, clock=clock or Clock())


async def make_service(
    state_root: Path, controller: EndpointController | None = None, **settings
) -> tuple[EndpointService, EndpointController]:
    controller = controller or make_controller()
    attachment = Attachment(INGRESS_APP, str(state_root), EndpointSettings(**settings))
    service = EndpointService({"base": "smollm2-135m-instruct"}, LocalClient(controller, attachment))
    await service.attach()
    return service, controller


def request(name: str = "ep", **changes) -> CreateLLMEndpointRequest:
    body = {"name": name, "model_name": "smollm2-135m-instruct", "min_workers": 0, "max_workers": 1}
    return CreateLLMEndpointRequest.model_validate({**body, **changes})
