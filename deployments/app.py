"""Build the Serve application: one ModelServer deployment per model, one Ingress in front.

`serve run serve_config.yaml` calls `build_app(args)` with the YAML's `args:` mapping.
"""

from __future__ import annotations

import tempfile
from typing import Any

from ray import serve

from deployments.batch.config import BatchSettings
from deployments.batch.service import BatchContext, factory_path
from deployments.config import AppConfig, EndpointSettings, IngressSettings, ModelConfig, parse_app_config
from deployments.endpoints.views import framework_tag
from deployments.engines.placement import deployment_for
from deployments.ingress import Ingress
from deployments.limits import AuthSettings, LimitSettings
from deployments.model_server import EngineFactory, ModelServer
from model_zoo import CATALOGUE


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application described by `args` (see `deployments.config.AppConfig`); ConfigError if invalid."""
    config: AppConfig = parse_app_config(args)
    return build_app_from_configs(
        config.models,
        ingress=config.ingress,
        limits=config.limits,
        auth=config.auth,
        batch=config.batch,
        endpoints=config.endpoints,
        state_root=config.state_root,
    )


def build_app_from_configs(
    models: list[ModelConfig],
    engine_factory: EngineFactory | None = None,
    ingress: IngressSettings | None = None,
    limits: LimitSettings | None = None,
    auth: AuthSettings | None = None,
    batch: BatchSettings | None = None,
    endpoints: EndpointSettings | None = None,
    state_root: str | None = None,
) -> serve.Application:
    """The application for already-validated model configs; tests pass a fake `engine_factory` (which
    runtime endpoints get too). Without `state_root`, records go to a new temporary folder: they last
    as long as it does (serve_config.yaml's `state_root` has a lasting default)."""
    model_server = serve.deployment(ModelServer)
    handles = {
        m.name: model_server.options(name=f"ModelServer:{m.name}", **options).bind(m, factory)
        for m in models
        for options, factory in [deployment_for(m, engine_factory)]
    }
    model_names = {m.name: _base_model_name(m) for m in models}
    wait_timeouts_s = {m.name: m.replica_wait_timeout_s for m in models}
    ingress_options = (ingress or IngressSettings()).to_options()
    configs_json = {m.name: m.model_dump_json() for m in models}
    batch_context = BatchContext(
        batch or BatchSettings(), configs_json, limits or LimitSettings(), factory_path(engine_factory)
    )
    api_keys = (auth or AuthSettings()).resolve_keys()  # the env var is read here, where the app is built
    return (
        serve.deployment(Ingress)
        .options(name="Ingress", **ingress_options)
        .bind(
            handles,
            model_names,
            limits or LimitSettings(),
            api_keys,
            wait_timeouts_s,
            batch=batch_context,
            endpoints=endpoints or EndpointSettings(),
            state_root=state_root or tempfile.mkdtemp(prefix="llmserve-state-"),
            engine_factory=engine_factory,
            framework_tags={m.name: framework_tag(m) for m in models},
        )
    )


def _base_model_name(config: ModelConfig) -> str:
    """The zoo name when the model is one (listed as `model_name`), else the served name."""
    return config.model if config.model in CATALOGUE else config.name
