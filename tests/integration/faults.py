"""Fault injection for integration tests, in its own module so that Serve replicas can import it."""

from __future__ import annotations

from pathlib import Path

from deployments.config import ModelConfig
from deployments.model_server import ServingModel, load_serving_model


class BreakableFactory:
    """The real engine; its forward raises while `marker` exists (checked once per forward)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __call__(self, config: ModelConfig) -> ServingModel:
        serving = load_serving_model(config)
        runner = serving.engine.core.runner
        real_execute, marker = runner.execute, self.marker

        def execute(batch):
            if marker.exists():
                raise RuntimeError("simulated device failure (marker file present)")
            return real_execute(batch)

        runner.execute = execute
        return serving
