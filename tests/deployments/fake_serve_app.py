"""The fake-engine app as `serve run` builds it (tests/deployments/test_batch_restart.py): one fake model,
batch jobs under the data root given in the config's args, their workers on the same fake engine."""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.app import build_app_from_configs
from deployments.batch.config import BatchSettings
from deployments.config import DeploymentSettings, ModelConfig
from tests.deployments.fake_engine import FAKE_MODELS, fake_factory


def build(args: dict[str, Any]) -> serve.Application:
    light = DeploymentSettings(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)
    model = ModelConfig(name=FAKE_MODELS[0], model="fake", deployment=light)
    batch = BatchSettings.model_validate(args["batch"])
    return build_app_from_configs([model], engine_factory=fake_factory, batch=batch)
