"""Fault injection for integration tests, in its own module so that Serve replicas can import it."""

from __future__ import annotations

import time
from pathlib import Path

from deployments.config import ModelConfig
from deployments.model_server import ServingModel, load_serving_model


class BreakableFactory:
    """The real engine; its forward raises while `marker` exists (checked once per forward). With
    `hold_at`, a forward that only decodes and carries `hold_at` sequences first waits (up to 120 s) for
    the marker: the streams that test opened cannot run to their end before it breaks the device,
    however fast the machine."""

    def __init__(self, marker: Path, hold_at: int | None = None) -> None:
        self.marker, self.hold_at = marker, hold_at

    def __call__(self, config: ModelConfig) -> ServingModel:
        serving = load_serving_model(config)
        runner = serving.engine.core.runner
        real_execute, marker, hold_at = runner.execute, self.marker, self.hold_at

        def execute(batch):
            decode_only = batch.num_decode == len(batch.items)
            if hold_at is not None and decode_only and len(batch.items) == hold_at:
                deadline = time.monotonic() + 120
                while not marker.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            if marker.exists():
                raise RuntimeError("simulated device failure (marker file present)")
            return real_execute(batch)

        runner.execute = execute
        return serving
