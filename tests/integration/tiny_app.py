"""The integration tests' app: the real engine serving the tiny random-weight model."""

from pathlib import Path

from ray import serve

from deployments.app import build_app_from_configs
from deployments.config import DeploymentSettings, EndpointSettings, EngineSettings, ModelConfig
from deployments.model_server import EngineFactory

TINY_MODEL = "tiny"
TINY_MAX_MODEL_LEN = 256


def build_tiny_app(model_dir: Path, engine_factory: EngineFactory | None = None) -> serve.Application:
    """float32 for run-to-run determinism; one torch thread and half a logical CPU (2 cores here)."""
    model = ModelConfig(
        name=TINY_MODEL,
        model=str(model_dir),
        engine=EngineSettings(
            dtype="float32", max_model_len=TINY_MAX_MODEL_LEN, kv_cache_bytes=16 * 1024**2, num_threads=1
        ),
        # Stream messages up to 1 s apart at a full batch: ~30 ms for a lone stream, several tiny-model
        # steps, so every streaming test here also checks coalesced chunks (one event per token still).
        stream_coalesce_ms=1000,
        # a health probe every second: a dead engine is replaced within seconds (test_engine_death.py)
        deployment=DeploymentSettings(
            ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32, health_check_period_s=1.0
        ),
    )
    # Endpoints created at runtime (test_model_endpoints.py) get the same small engine; a replica that
    # fails to start once fails the change (the broken-weights test needs no retries). Checkpoints may
    # come from pytest's temporary folders (the tiny model's and the tests' own).
    endpoints = EndpointSettings(
        engine=model.engine, max_start_attempts=1, checkpoint_roots=[str(model_dir.parent)]
    )
    return build_app_from_configs([model], engine_factory=engine_factory, endpoints=endpoints)
