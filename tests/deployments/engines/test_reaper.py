"""The reaper: when a replica dies without shutting its engine down (SIGKILL), its child processes go.
Outside Ray (which, here, also ends a dead worker's children), with a stand-in child."""

import subprocess
import sys
import time

import psutil

from deployments.config import REPO_ROOT

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
from deployments.engines.reaper import start_reaper
start_reaper()
print(child.pid, flush=True)
time.sleep(120)
"""


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_replicas_children_are_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, cwd=REPO_ROOT)
    child = int(parent.stdout.readline())
    assert not is_gone(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while not is_gone(child) and time.monotonic() < deadline:  # the reaper polls every 0.5 s
        time.sleep(0.1)
    try:
        assert is_gone(child)
    finally:
        if not is_gone(child):
            psutil.Process(child).kill()
