"""deployments/serve_status.py against Serve itself: the same applications, states, messages and replica
counts as `serve.status()`, on a running app and on one that failed to deploy."""

from __future__ import annotations

import time

import pytest
from ray import serve
from ray.serve import RunTarget
from ray.serve.schema import ApplicationStatus

from deployments import serve_status


@serve.deployment(ray_actor_options={"num_cpus": 0.01})
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("this replica never starts")


def _public() -> dict:
    """serve.status()'s applications in serve_status's terms."""
    return {
        name: serve_status.ApplicationStatus(
            status=app.status.value,
            message=app.message,
            deployments={
                deployment_name: serve_status.DeploymentStatus(
                    status=deployment.status.value,
                    message=deployment.message,
                    replica_states=dict(deployment.replica_states),
                )
                for deployment_name, deployment in app.deployments.items()
            },
        )
        for name, app in serve.status().applications.items()
    }


def test_it_says_what_serve_status_says(fake_app_url: str):
    broken = Broken.options(max_constructor_retry_count=1).bind()
    serve.run_many(
        [RunTarget(broken, name="broken-status", route_prefix=None)], wait_for_applications_running=False
    )
    try:
        deadline = time.monotonic() + 60
        while (broken := serve_status.applications().get("broken-status")) is None or (
            broken.status != "DEPLOY_FAILED"
        ):
            assert time.monotonic() < deadline, broken
            time.sleep(0.2)
        for _ in range(3):  # Serve may move between the two reads (other tests' apps): one of three
            ours, public = serve_status.applications(), _public()
            if ours == public:
                break
        assert ours == public
        assert ours["fake"].status == "RUNNING"
        assert all(d.replica_states.get("RUNNING", 0) >= 1 for d in ours["fake"].deployments.values())
        assert "this replica never starts" in ours["broken-status"].deployments["Broken"].message
    finally:
        serve.delete("broken-status")


@pytest.mark.parametrize("status", ["RUNNING", "DEPLOY_FAILED"])
def test_a_status_is_its_plain_value(status: str):
    assert serve_status._value(ApplicationStatus(status)) == serve_status._value(status) == status
