"""deployments/state/owner.py: one owner actor by name, restarted after a crash, replaced on new code."""

import time

import pytest
import ray

from deployments.state import owner as owner_module
from deployments.state.owner import owner
from tests.deployments.fake_owner import Counter


def test_one_owner_by_name_restarted_after_a_crash_and_replaced_on_upgrade(serve_port, monkeypatch) -> None:
    name = "test-state-owner-counter"
    first = owner(Counter, name, 10)
    assert ray.get(first.increment.remote()) == 11
    again = owner(Counter, name, 10)
    assert ray.get(again.increment.remote()) == 12  # the same actor, not a second one

    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(first.crash.remote())  # the process dies; Ray restarts it with its constructor's arguments
    assert _after_restart(lambda: ray.get(first.increment.remote())) == 11

    monkeypatch.setattr(owner_module, "code_version", lambda: "a-later-release")
    replaced = owner(Counter, name, 100)  # the running actor reports the old code: replaced
    assert ray.get(replaced.increment.remote()) == 101
    ray.kill(replaced, no_restart=True)


def _after_restart(call, timeout_s: float = 60.0):
    """`call()` once the restarting actor takes calls again (an event, not a timing: Ray says when)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except ray.exceptions.RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
