"""What `Model.get` / `Model.list` show of an endpoint: configured models and runtime records."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from deployments.config import ModelConfig
from deployments.endpoints.deployer import AppState
from deployments.endpoints.registry import EndpointRecord
from deployments.endpoints.resources import resources_of, scaling_of
from deployments.endpoints.wire import FRAMEWORK, DeploymentState, EndpointSpec, ResourceState
from deployments.engines import resolve_engine_kind, vllm_version
from deployments.engines.placement import num_devices
from deployments.protocol.llm_engine import ModelEndpoint


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


# What really serves a model: `inference_framework` must be one of the client's closed list ("vllm"
# for both engines), so the tag says which engine and version it is.
FRAMEWORK_TAG = (
    f"llmserve-{_version('llmserve')} (its own continuous-batching engine on torch {_version('torch')}, "
    f"transformers {_version('transformers')}; not vLLM)"
)


def framework_tag(config: ModelConfig) -> str:
    """The engine that serves `config`, with its version."""
    if resolve_engine_kind(config) == "vllm":
        return f"{vllm_version() or 'vllm (not installed)'} (vLLM's AsyncLLM, in its own venv)"
    return FRAMEWORK_TAG


def configured_view(name: str, model_name: str, tag: str = FRAMEWORK_TAG) -> ModelEndpoint:
    """A model of the app's config: READY while the app runs (Serve owns its lifecycle). `tag` is
    `framework_tag(config)`, computed where the app is built (the ingress has no model configs)."""
    return ModelEndpoint(
        id=name,
        name=name,
        model_name=model_name,
        inference_framework=FRAMEWORK,
        inference_framework_tag=tag,
    )


def record_view(record: EndpointRecord, app: AppState | None) -> ModelEndpoint:
    """A runtime endpoint, with `spec` (the client's GetModelEndpointResponse) filled in."""
    needs = resources_of(record.config)
    min_workers, max_workers, per_worker = scaling_of(record.config)
    metadata = {
        **record.metadata,
        "status_reason": record.status_reason,
        "requested_inference_framework_image_tag": record.image_tag,
        "model": record.config.model,
    }
    spec = EndpointSpec(
        id=record.name,
        name=record.name,
        destination=f"{record.app_name}/{record.deployment_name}",
        deployment_name=record.deployment_name,
        metadata=metadata,
        bundle_name=record.config.model,
        status=record.status,
        labels=record.labels,
        created_at=record.created_at,
        last_updated_at=record.last_updated_at,
        deployment_state=DeploymentState(
            min_workers=min_workers,
            max_workers=max_workers,
            per_worker=per_worker,
            concurrent_requests_per_worker=record.config.deployment.max_ongoing_requests,
            available_workers=app.num_running if app is not None else 0,
            unavailable_workers=app.num_other if app is not None else 0,
        ),
        resource_state=ResourceState(
            cpus=needs.num_cpus,
            gpus=needs.num_gpus,
            memory=needs.memory_bytes,
            gpu_type=needs.gpu_type,
            storage=record.storage,
        ),
        public_inference=record.public_inference,
    )
    return ModelEndpoint(
        id=record.name,
        name=record.name,
        model_name=record.model_name,
        status=record.status,
        inference_framework=FRAMEWORK,
        inference_framework_tag=framework_tag(record.config),
        num_shards=num_devices(record.config),
        spec=spec.model_dump(mode="json"),
    )
