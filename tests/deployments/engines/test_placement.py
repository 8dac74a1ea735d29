"""Tensor parallelism through the replica's placement group, as Ray Serve LLM builds it: the options
for vLLM models, and (with two logical GPUs, no GPU needed) where the replica and its workers land."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.config import REPO_ROOT, ConfigError, ModelConfig
from deployments.engines.placement import merge_replica_bundle, num_devices, vllm_deployment_options

PYTHON = Path("/venv-vllm/bin/python")


def config(num_gpus: float = 0, tp: int = 1, num_cpus: float = 1) -> ModelConfig:
    actor = {"num_cpus": num_cpus, "num_gpus": num_gpus, "memory": 2**30}
    return ModelConfig.model_validate(
        {
            "name": "m",
            "model": "m",
            "engine": {"kind": "vllm", "tensor_parallel_size": tp},
            "deployment": {"ray_actor_options": actor, "max_ongoing_requests": 8},
        }
    )


def test_a_gpu_model_gets_one_bundle_per_device_with_the_replica_in_the_first():
    options = vllm_deployment_options(config(num_gpus=1, tp=4, num_cpus=2), PYTHON)
    assert options["placement_group_bundles"] == [
        {"CPU": 2.0, "GPU": 1.0, "memory": 2**30},
        {"GPU": 1.0},
        {"GPU": 1.0},
        {"GPU": 1.0},
    ]
    assert options["placement_group_strategy"] == "PACK"
    actor = options["ray_actor_options"]
    assert actor["num_gpus"] == 0 and actor["num_cpus"] == 2  # the devices are the workers'
    assert actor["runtime_env"] == {"py_executable": str(PYTHON)}
    assert options["max_ongoing_requests"] == 8


def test_num_gpus_alone_sets_the_devices_and_a_cpu_model_needs_no_placement_group():
    assert num_devices(config(num_gpus=2)) == 2
    assert len(vllm_deployment_options(config(num_gpus=2), PYTHON)["placement_group_bundles"]) == 2
    cpu = vllm_deployment_options(config(), PYTHON)
    assert "placement_group_bundles" not in cpu and cpu["ray_actor_options"]["num_cpus"] == 1
    assert merge_replica_bundle([{"CPU": 1.0}, {"CPU": 1.0}], {"CPU": 0.5}) == [{"CPU": 1.5}, {"CPU": 1.0}]


def test_max_replicas_per_node_beside_a_placement_group_is_a_config_error_naming_it():
    gpu = config(num_gpus=1)
    gpu.deployment.max_replicas_per_node = 1
    with pytest.raises(ConfigError, match="max_replicas_per_node"):
        vllm_deployment_options(gpu, PYTHON)
    cpu = config()
    cpu.deployment.max_replicas_per_node = 2  # vLLM on one CPU: no placement group, Serve takes it
    assert vllm_deployment_options(cpu, PYTHON)["max_replicas_per_node"] == 2


def test_with_two_logical_gpus_the_replica_and_its_two_workers_are_placed():
    check = [sys.executable, "-m", "tests.deployments.engines.placement_check"]
    # its own driver: Serve's throughput mode (set in this process's environment for the Ray this session
    # starts) would make that driver's blocking handle calls fail
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(check, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("PLACEMENT "))
    report = json.loads(line.removeprefix("PLACEMENT "))
    assert report["bundle_specs"] == [{"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0}]
    assert report["replica_gpu_ids"] == []  # the replica itself holds no device
    assert sorted(g for ids in report["worker_gpu_ids"] for g in ids) == ["0", "1"]  # one each
    assert report["python"] == sys.executable  # py_executable of the options
