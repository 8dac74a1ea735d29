"""Routing across nodes: runs two_node_check.py in its own process (it needs its own Ray cluster)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("two_node_check.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_PREFIX = "TWO_NODE_RESULT "


@pytest.mark.timeout(420)  # the script itself may run 300 s (a two-node cluster starting)
def test_replicas_on_both_nodes_answer() -> None:
    # its own cluster and Serve settings (it sets them), not this session's
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(line.removeprefix(RESULT_PREFIX))
    assert result["nodes"] == {"on-head": result["head"], "on-worker": result["worker"]}
    assert result["head"] != result["worker"]
    assert result["status"] == {"on-head": 200, "on-worker": 200}
