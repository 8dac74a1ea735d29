"""The app of the restart test, for `serve run`: one fake-engine model, records under `state_root`."""

from typing import Any

from ray import serve

from deployments.app import build_app_from_configs
from deployments.batch.config import BatchSettings
from deployments.config import DeploymentSettings, IngressSettings, ModelConfig
from tests.deployments.fake_engine import fake_factory


def build(args: dict[str, Any]) -> serve.Application:
    """`args`: {"state_root": folder, "data_root": folder}. Runtime endpoints get the fake engine too."""
    light = DeploymentSettings(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=8)
    return build_app_from_configs(
        [ModelConfig(name="fake", model="fake", deployment=light)],
        engine_factory=fake_factory,
        ingress=IngressSettings(ray_actor_options={"num_cpus": 0.1}),
        batch=BatchSettings(data_root=args["data_root"]),
        state_root=args["state_root"],
    )
