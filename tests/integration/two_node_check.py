"""Two models on a simulated two-node Ray cluster: replicas land on both nodes, both answer over HTTP.

Run as its own process (it starts its own Ray cluster): `python tests/integration/two_node_check.py`.
Prints one line "TWO_NODE_RESULT <json>":
{"nodes": {model: node_id}, "head": id, "worker": id, "status": {model: code}}.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from deployments.app import build_app_from_configs
from deployments.config import DeploymentSettings, EngineSettings, ModelConfig
from tests.serve_fixtures import free_port, use_readme_serve_env
from tests.tiny_model import build_tiny_model

RESULT_PREFIX = "TWO_NODE_RESULT "  # Ray also logs to stdout
# A custom resource per node pins each model to one of them.
PLACEMENT = {"on-head": "head-node", "on-worker": "worker-node"}


def model(name: str, folder: Path) -> ModelConfig:
    deployment = DeploymentSettings(
        ray_actor_options={"num_cpus": 0.3, "resources": {PLACEMENT[name]: 0.1}}, num_replicas=1
    )
    engine = EngineSettings(dtype="float32", max_model_len=128, kv_cache_bytes=4 * 2**20, num_threads=1)
    return ModelConfig(name=name, model=str(folder), engine=engine, deployment=deployment)


def replica_node_ids() -> dict[str, str]:
    """Model name -> node id of its replica actor, asked of the actor itself."""
    nodes = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        for name in PLACEMENT:
            if f"ModelServer:{name}#" in actor["name"]:
                handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
                node_id = handle.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
                nodes[name] = ray.get(node_id, timeout=30)
    return nodes


def main() -> None:
    use_readme_serve_env()  # as the suite's Serve, with HAProxy files and ports of its own
    # Ports of its own (another Ray may run on this machine: a test session, a pytest-xdist worker)
    own_ports = {"include_dashboard": False, "dashboard_port": free_port()}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"head-node": 1}, **own_ports},
    )
    worker = cluster.add_node(num_cpus=2, resources={"worker-node": 1}, **own_ports)
    try:
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        folder = build_tiny_model(Path(tempfile.mkdtemp(prefix="two_node_")))
        app = build_app_from_configs([model(name, folder) for name in PLACEMENT])
        serve.run(app, name="two-node", route_prefix="/")
        statuses = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/", timeout=60) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if client.get("healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            for name in PLACEMENT:
                body = {"prompt": "Hello", "max_new_tokens": 4, "temperature": 0}
                url = "v1/llm/completions-sync"
                response = client.post(url, params={"model_endpoint_name": name}, json=body)
                statuses[name] = response.status_code
        head_id = ray.get_runtime_context().get_node_id()  # the driver runs on the head node
        result = {
            "nodes": replica_node_ids(),
            "head": head_id,
            "worker": worker.node_id,
            "status": statuses,
        }
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
