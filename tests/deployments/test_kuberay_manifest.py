"""The KubeRay manifest and the default Serve config parse with Ray's Serve schema and our AppConfig."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.config import REPO_ROOT, parse_app_config

MANIFEST = REPO_ROOT / "configs" / "kuberay" / "rayservice.yaml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def check_serve_config(config: dict) -> list[str]:
    """Validate with Ray's schema, then each application's args with ours; the served model names."""
    schema = ServeDeploySchema.parse_obj(config)
    names = []
    for application in schema.applications:
        assert application.import_path == "deployments.app:build_app"
        app_config = parse_app_config(application.args)
        names += [m.name for m in app_config.models]
    return names


def test_manifest_is_a_rayservice_on_gpu_workers():
    manifest = load(MANIFEST)
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayService")
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replicas on the head
    for group in cluster["workerGroupSpecs"]:
        worker = group["template"]["spec"]["containers"][0]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def test_manifest_serve_config_validates_with_ray_and_app_config():
    serve_config = yaml.safe_load(load(MANIFEST)["spec"]["serveConfigV2"])
    names = check_serve_config(serve_config)
    assert names == ["llama-3-8b-instruct", "mistral-7b-instruct"]
    models = serve_config["applications"][0]["args"]["models"]
    assert all(m["deployment"]["ray_actor_options"]["num_gpus"] == 1 for m in models)
    assert all(m["engine"]["device"] == "cuda" and m["engine"]["kind"] == "vllm" for m in models)
    cluster = load(MANIFEST)["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for pod in pods:  # every pod finds the image's vLLM venv (the head builds the app: it checks the venv)
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert env["LLMSERVE_VLLM_PYTHON"] == "/home/ray/venv-vllm/bin/python"


@pytest.mark.parametrize("path", ["serve_config.yaml"])
def test_default_serve_config_validates(path):
    assert "smollm2-135m-instruct" in check_serve_config(load(REPO_ROOT / path))
