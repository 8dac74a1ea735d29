"""Model-endpoint requests without Ray: the client's exact body, bounds, and the Serve options they map to."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from deployments.config import EngineSettings
from deployments.endpoints.resources import (
    autoscaling,
    check_model,
    code_version,
    model_config,
    parse_cpus,
    parse_memory,
    resources,
    resources_of,
    scaling_of,
)
from deployments.endpoints.wire import CreateLLMEndpointRequest, UpdateLLMEndpointRequest
from engine.errors import InvalidRequestError

os.environ.setdefault("LLM_ENGINE_DISABLE_VERSION_CHECK", "true")
from llmengine.data_types import CreateLLMEndpointRequest as ClientCreate
from llmengine.data_types import UpdateLLMEndpointRequest as ClientUpdate


def client_body(**changes) -> dict:
    """The JSON `Model.create` posts: every one of the client's 67 keys."""
    fields = {"name": "ep", "model_name": "m", "inference_framework_image_tag": "latest", "metadata": {}}
    fields |= {"min_workers": 0, "max_workers": 1, "per_worker": 2, "labels": {}} | changes
    return ClientCreate(**fields).dict()


def test_the_clients_create_body_parses():
    request = CreateLLMEndpointRequest.model_validate(client_body(cpus=2, memory="4Gi", max_model_len=128))
    assert (request.name, request.model_name, request.inference_framework) == ("ep", "m", "vllm")
    assert (request.min_workers, request.max_workers, request.per_worker) == (0, 1, 2)
    assert (request.cpus, request.memory, request.max_model_len) == ("2", "4Gi", 128)  # the client sends str


def test_the_clients_update_body_parses():
    request = UpdateLLMEndpointRequest.model_validate(ClientUpdate(min_workers=1, per_worker=4).dict())
    assert (request.min_workers, request.max_workers, request.per_worker) == (1, None, 4)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"name": "-x"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"num_shards": 2, "inference_framework_image_tag": "llmserve"}, "num_shards"),
        ({"quantize": "awq"}, "quantize"),
        ({"inference_framework": "deepspeed"}, "inference_framework"),
        ({"min_workers": -1}, "min_workers"),
        ({"max_workers": 0}, "max_workers"),
        ({"per_worker": 0}, "per_worker"),
        ({"min_workers": 2, "max_workers": 1}, "max_workers"),
        ({"gpus": 2, "inference_framework_image_tag": "llmserve"}, "gpus"),
        ({"inference_framework_image_tag": "tgi-2.0"}, "inference_framework_image_tag"),
        ({"gpu_type": "nvidia-ampere-a10"}, "gpu_type"),
        ({"nodes_per_worker": 2}, "nodes_per_worker"),
        ({"post_inference_hooks": ["callback"]}, "post_inference_hooks"),
    ],
)
def test_bad_fields_are_refused_by_name(changes: dict, field: str):
    with pytest.raises(ValidationError, match=field):
        CreateLLMEndpointRequest.model_validate({**client_body(), **changes})


@pytest.mark.parametrize(("value", "cpus"), [(1, 1.0), ("2", 2.0), (0.5, 0.5), ("500m", 0.5), ("0.1", 0.1)])
def test_cpus(value, cpus: float):
    assert parse_cpus(value) == pytest.approx(cpus)


@pytest.mark.parametrize(
    ("value", "num_bytes"), [("4Gi", 4 * 2**30), ("512Mi", 2**29), ("8G", 8 * 10**9), (1024, 1024)]
)
def test_memory(value, num_bytes: int):
    assert parse_memory(value) == num_bytes


@pytest.mark.parametrize("value", [0, -1, "0", "2x", "lots", 10**6, True])
def test_cpus_out_of_range_name_the_field(value):
    with pytest.raises(InvalidRequestError, match="cpus"):
        parse_cpus(value)


@pytest.mark.parametrize("value", [0, "-1Gi", "4Xi", "lots", "100Ti"])
def test_memory_out_of_range_names_the_field(value):
    with pytest.raises(InvalidRequestError, match="memory"):
        parse_memory(value)


def test_resources_map_to_ray_actor_options():
    needs = resources(cpus="2", gpus=1, memory="1Gi", gpu_type="nvidia-ampere-a10", default_num_cpus=0.1)
    assert needs.to_ray_actor_options() == {
        "num_cpus": 2.0,
        "num_gpus": 1,
        "memory": 2**30,
        "accelerator_type": "A10G",
    }
    assert resources(
        cpus=None, gpus=None, memory=None, gpu_type=None, default_num_cpus=0.1
    ).to_ray_actor_options() == {"num_cpus": 0.1}
    with pytest.raises(InvalidRequestError, match="gpu_type"):
        resources(cpus=None, gpus=1, memory=None, gpu_type="nvidia-hopper-h100-1g20gb", default_num_cpus=1)


def test_workers_map_to_autoscaling_and_back():
    scaling = autoscaling(0, 3, 5)
    assert scaling == {
        "min_replicas": 0,
        "max_replicas": 3,
        "initial_replicas": 1,
        "target_ongoing_requests": 5,
    }
    deployment = {"ray_actor_options": {"num_cpus": 0.1}, "autoscaling_config": scaling}
    config = model_config("ep", "smollm2-135m-instruct", EngineSettings(), deployment, 30.0)
    assert scaling_of(config) == (0, 3, 5)
    assert resources_of(config).num_cpus == pytest.approx(0.1)


def test_per_worker_above_what_a_replica_takes_is_400():
    deployment = {"ray_actor_options": {"num_cpus": 0.1}, "autoscaling_config": autoscaling(0, 1, 10_000)}
    with pytest.raises(InvalidRequestError, match="per_worker"):
        model_config("ep", "smollm2-135m-instruct", EngineSettings(), deployment, 30.0)


def test_scaling_keeps_the_code_version_and_the_engine_changes_it():
    def config(scaling, engine: EngineSettings | None = None):
        deployment = {"ray_actor_options": {"num_cpus": 0.1}, "autoscaling_config": scaling}
        return model_config("ep", "smollm2-135m-instruct", engine or EngineSettings(), deployment, 30.0)

    base = code_version(config(autoscaling(0, 1, 2)))
    assert code_version(config(autoscaling(1, 4, 8))) == base
    assert code_version(config(autoscaling(0, 1, 2), EngineSettings(max_num_seqs=4))) != base


def test_model_is_a_zoo_name_or_a_local_folder(tiny_model_dir):
    roots = [str(tiny_model_dir.parent)]
    assert check_model("smollm2-135m-instruct", None) == "smollm2-135m-instruct"
    assert check_model("anything", str(tiny_model_dir), roots) == str(tiny_model_dir.resolve())
    with pytest.raises(InvalidRequestError, match="model_name"):
        check_model("gpt-9", None)
    for path in ("s3://bucket/model", "/no/such/folder", "~nobody-here/x", "x" * 5000, "a\x00b"):
        with pytest.raises(InvalidRequestError, match="checkpoint_path"):
            check_model("anything", path, roots)
