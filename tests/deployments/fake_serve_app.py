"""The fake-engine app as `serve run` builds it (tests/integration/test_restart.py,
benchmarks/upload_stream_gap.py): one fake model; batch jobs under the data root given in the
config's args, their workers on the same fake engine; runtime endpoints, on the fake engine too,
recorded under the args' `state_root` (a fresh temporary folder when none is given)."""

from __future__ import annotations

from typing import Any

from ray import serve

from deployments.app import build_app_from_configs
from deployments.batch.config import BatchSettings
from deployments.config import DeploymentSettings, IngressSettings, ModelConfig
from tests.deployments.fake_engine import FAKE_MODELS, fake_factory


def build(args: dict[str, Any]) -> serve.Application:
    """`args`: {"batch": BatchSettings, "state_root": folder (optional)}."""
    light = DeploymentSettings(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=32)
    return build_app_from_configs(
        [ModelConfig(name=FAKE_MODELS[0], model="fake", deployment=light)],
        engine_factory=fake_factory,
        ingress=IngressSettings(ray_actor_options={"num_cpus": 0.1}),
        batch=BatchSettings.model_validate(args["batch"]),
        state_root=args.get("state_root"),
    )
