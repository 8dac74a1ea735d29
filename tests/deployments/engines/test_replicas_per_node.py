"""One replica per node for this project's engine on CPU when its threads use every core: the deployment
options, the endpoint check that refuses a min_workers the nodes cannot hold, and Serve keeping a second
replica of such a model off the one node of the test Ray."""

import time

import pytest
from ray import serve
from ray.serve import RunTarget

from deployments.app import build_app_from_configs
from deployments.config import DeploymentSettings, EngineSettings, ModelConfig
from deployments.endpoints import deployer
from deployments.endpoints.resources import Resources
from deployments.engines import placement
from tests.deployments.fake_engine import fake_factory
from tests.serve_fixtures import delete_app, replica_states

APP = "per-node"
WHOLE_NODE = "ModelServer:whole-node"


def model(name: str = "m", num_threads: int | None = None, num_gpus: float = 0, **deployment) -> ModelConfig:
    actor = {"num_cpus": 0.1, "num_gpus": num_gpus} if num_gpus else {"num_cpus": 0.1}
    return ModelConfig(
        name=name,
        model="fake",
        engine=EngineSettings(kind="llmserve", num_threads=num_threads),
        deployment=DeploymentSettings(ray_actor_options=actor, **deployment),
    )


def test_a_cpu_replica_whose_threads_use_every_core_takes_a_node_to_itself():
    options, _ = placement.deployment_for(model())
    assert options["max_replicas_per_node"] == 1
    # threads limited: replicas share a node; on a GPU each has its own device; the config's value wins
    assert "max_replicas_per_node" not in placement.deployment_for(model(num_threads=1))[0]
    assert "max_replicas_per_node" not in placement.deployment_for(model(num_gpus=1))[0]
    assert placement.deployment_for(model(max_replicas_per_node=3))[0]["max_replicas_per_node"] == 3


def test_an_endpoint_whose_min_workers_the_nodes_cannot_hold_is_refused_naming_why(monkeypatch):
    node = {"Alive": True, "Resources": {"CPU": 2.0, "memory": 8 * 2**30}}
    monkeypatch.setattr(deployer.ray, "nodes", lambda: [node])
    one_cpu = Resources(num_cpus=0.1, num_gpus=0, memory_bytes=0, gpu_type=None)
    reason = deployer.unplaceable(one_cpu, min_replicas=2, per_node=1)
    assert reason is not None and "min_workers 2 needs 2 nodes" in reason and "1 node(s)" in reason
    assert deployer.unplaceable(one_cpu, min_replicas=1, per_node=1) is None
    assert deployer.unplaceable(one_cpu, min_replicas=2, per_node=None) is None  # threads limited
    monkeypatch.setattr(deployer.ray, "nodes", lambda: [node, node])
    assert deployer.unplaceable(one_cpu, min_replicas=2, per_node=1) is None


def test_serve_keeps_the_second_replica_off_the_node(serve_port: int):
    """Two replicas asked on the one-node test cluster, which has room for both (4 logical CPUs, 0.1 a
    replica): one runs, the second stays unplaced (with the rule removed, both run)."""
    app = build_app_from_configs([model("whole-node", num_replicas=2)], engine_factory=fake_factory)
    target = RunTarget(target=app, name=APP, route_prefix="/per-node")
    serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    try:
        deadline = time.monotonic() + 90
        while not replica_states(APP, WHOLE_NODE).get("RUNNING"):
            if time.monotonic() > deadline:
                pytest.fail(f"no replica started: {replica_states(APP, WHOLE_NODE)}")
            time.sleep(0.25)
        time.sleep(3)  # room for the second replica to start, were it placed (they start side by side)
        states = replica_states(APP, WHOLE_NODE)
        assert states.get("RUNNING") == 1 and sum(states.values()) == 2, states
    finally:
        delete_app(APP)
