"""A create or update request as the record it leads to: every check that needs no cluster state.

Blocking (a checkpoint folder and the model's config.json are read): the controller calls these in a
worker thread. They raise `InvalidRequestError` (400) naming the field and the limit.
"""

from __future__ import annotations

import uuid

from deployments.config import EndpointSettings, EngineSettings, ModelConfig
from deployments.endpoints.checks import check_fits
from deployments.endpoints.registry import PENDING, EndpointRecord
from deployments.endpoints.resources import (
    Resources,
    autoscaling,
    check_model,
    engine_for,
    model_config,
    resources,
    resources_of,
    scaling_of,
)
from deployments.endpoints.wire import CreateLLMEndpointRequest, UpdateLLMEndpointRequest
from engine.errors import InvalidRequestError


def plan_create(
    ingress_app: str, request: CreateLLMEndpointRequest, settings: EndpointSettings
) -> EndpointRecord:
    """The pending record of a new endpoint."""
    model = check_model(request.model_name, request.checkpoint_path, settings.checkpoint_roots)
    needs = resources(
        cpus=request.cpus,
        gpus=request.gpus,
        memory=request.memory,
        gpu_type=request.gpu_type,
        default_num_cpus=settings.default_num_cpus,
    )
    scaling = (request.min_workers, request.max_workers, request.per_worker)
    config = _config(request.name, model, settings.engine, request, needs, scaling, settings)
    check_fits(config)
    return EndpointRecord(
        name=request.name,
        app_name=f"{ingress_app}.{request.name}",
        deployment_name=f"ModelServer:{request.name}",
        model_name=request.model_name,
        config=config,
        storage=request.storage,
        labels=request.labels or {},
        metadata=request.metadata or {},
        image_tag=request.inference_framework_image_tag,
        public_inference=request.public_inference,
        task_id=str(uuid.uuid4()),
    )


def plan_update(
    record: EndpointRecord, request: UpdateLLMEndpointRequest, settings: EndpointSettings
) -> EndpointRecord:
    """The record after `request` (a new pending change), or a 400 if it cannot be applied in place."""
    name = record.name
    if record.status == PENDING:
        raise InvalidRequestError(f"model endpoint {name!r} is still UPDATE_PENDING; try again later")
    if not record.is_serving:
        raise InvalidRequestError(
            f"model endpoint {name!r} is {record.status} ({record.status_reason}); delete and create it"
        )
    if request.model_name not in (None, record.model_name):
        raise InvalidRequestError("model_name: cannot change in place; delete and create the endpoint")
    if request.checkpoint_path is not None and (
        check_model(record.model_name, request.checkpoint_path, settings.checkpoint_roots)
        != record.config.model
    ):
        raise InvalidRequestError("checkpoint_path: cannot change in place; delete and create the endpoint")
    now = resources_of(record.config)
    needs = resources(
        cpus=_given(request.cpus, now.num_cpus),
        gpus=_given(request.gpus, now.num_gpus),
        memory=_given(request.memory, now.memory_bytes or None),
        gpu_type=_given(request.gpu_type, now.gpu_type),
        default_num_cpus=settings.default_num_cpus,
    )
    old = scaling_of(record.config)
    given = (request.min_workers, request.max_workers, request.per_worker)
    scaling = tuple(_given(v, o) for v, o in zip(given, old, strict=True))
    config = _config(name, record.config.model, record.config.engine, request, needs, scaling, settings)
    check_fits(config)
    return record.model_copy(
        update={
            "previous_config": record.config,
            "config": config,
            "labels": _given(request.labels, record.labels),
            "metadata": _given(request.metadata, record.metadata),
            "storage": _given(request.storage, record.storage),
            "image_tag": _given(request.inference_framework_image_tag, record.image_tag),
            "status": PENDING,
            "status_reason": None,
            "task_id": str(uuid.uuid4()),
        }
    )


def _config(
    name: str,
    model: str,
    engine: EngineSettings,
    request: CreateLLMEndpointRequest | UpdateLLMEndpointRequest,
    needs: Resources,
    scaling: tuple[int, int, int],
    settings: EndpointSettings,
) -> ModelConfig:
    """The served model's config from the request's engine knobs, resources and scaling."""
    knobs = {k: getattr(request, k) for k in ("max_model_len", "max_num_seqs") if getattr(request, k)}
    deployment = {
        "ray_actor_options": needs.to_ray_actor_options(),
        "autoscaling_config": autoscaling(*scaling),
    }
    tag, shards = request.inference_framework_image_tag, request.num_shards
    engine = engine_for(engine.model_copy(update=knobs), image_tag=tag, num_shards=shards)
    return model_config(name, model, engine, deployment, settings.replica_wait_timeout_s)


def _given(value, current):
    """The request's value, or the current one where the request left the field null."""
    return current if value is None else value
