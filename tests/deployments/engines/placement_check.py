"""Run by test_placement.py in a fresh process: a Ray with two logical GPUs (no GPU needed), a Serve
deployment with the options a tensor-parallel vLLM model gets, and where its replica and two
GPU workers (as vLLM's Ray executor places them, one per bundle) land. Prints one JSON line."""

import json
import sys
from pathlib import Path

import ray
from ray import serve
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.config import ModelConfig
from deployments.engines.placement import vllm_deployment_options


@ray.remote(num_cpus=0, num_gpus=1)
def worker_gpu_ids() -> list[str]:
    return [str(i) for i in ray.get_gpu_ids()]


class Replica:
    """Stands in for the vLLM replica: reports its placement group and starts one worker per bundle."""

    def report(self) -> dict:
        pg = get_current_placement_group()
        workers = [
            worker_gpu_ids.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)
            ).remote()
            for i in range(len(pg.bundle_specs))
        ]
        return {
            "bundle_specs": pg.bundle_specs,
            "replica_gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "worker_gpu_ids": ray.get(workers, timeout=60),
            "python": sys.executable,
        }


def main() -> None:
    config = ModelConfig.model_validate(
        {
            "name": "tp2",
            "model": "tp2",
            "engine": {"kind": "vllm", "tensor_parallel_size": 2},
            "deployment": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1}},
        }
    )
    options = vllm_deployment_options(config, Path(sys.executable))
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    serve.start(http_options={"location": "NoServer"})
    handle = serve.run(
        serve.deployment(Replica).options(name="tp2", **options).bind(), name="tp2", route_prefix=None
    )
    report = handle.report.remote().result(timeout_s=120)
    print("PLACEMENT", json.dumps({"options": options, **report}), flush=True)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
