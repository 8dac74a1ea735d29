"""Kills a dead replica's vLLM processes: `python -m deployments.engines.reaper REPLICA_PID CHILDREN`.

vLLM's EngineCore runs in a child process of the replica and does not notice its parent's death, so a
SIGKILLed replica (OOM killer, `kill -9`) would leave it running, holding its memory and devices. This
watcher, started beside the engine in its own session, polls the replica and then SIGKILLs the child
processes it was given (pid and start time, so a reused pid is never hit)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


def kill_children(children: list[tuple[int, float]]) -> None:
    import psutil

    for pid, create_time in children:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if abs(process.create_time() - create_time) < 1e-3:
                process.send_signal(signal.SIGKILL)


def start_reaper() -> subprocess.Popen:
    """Watch this process: if it dies, its child processes of now (vLLM's) are killed."""
    import psutil

    children = [(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)]
    argv = [sys.executable, "-m", "deployments.engines.reaper", str(os.getpid()), json.dumps(children)]
    return subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL)


def main(argv: list[str]) -> None:
    replica_pid, children = int(argv[1]), [tuple(c) for c in json.loads(argv[2])]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the replica shut its engine down itself
    while is_alive(replica_pid):
        time.sleep(POLL_S)
    kill_children(children)


if __name__ == "__main__":
    main(sys.argv)
