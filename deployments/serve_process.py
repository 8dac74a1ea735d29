"""`serve run` as a child of `llmserve serve`: one stop signal in, nothing left holding the port after.

The child runs in a process group of its own, so a terminal's Ctrl-C (sent to the whole foreground
group) or a signal to this command's group reaches `serve run` exactly once, through this process:
the first SIGINT or SIGTERM becomes one SIGINT to `serve run` (its orderly path: `serve.shutdown()`,
then Ray's), a second becomes SIGTERM, a third SIGKILLs its group. Once it has exited, any haproxy
that `llmserve-haproxy` recorded in `pid_dir` and that is still running is stopped, so port 8000 is
free when this command returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

_ESCALATION = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
HAPROXY_STOP_TIMEOUT_S = 10.0


def run_supervised(command: Sequence[str], env: Mapping[str, str], pid_dir: Path) -> int:
    """Run `command` until it exits, relaying stop signals as above; returns its exit status."""
    relay = _Relay()
    # Handlers first: a caught signal is reset to its default in the child, an ignored one stays ignored
    # (a shell's background job ignores SIGINT, and `serve run` would then ignore the relayed one).
    previous = {sig: signal.signal(sig, relay.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        relay.child = subprocess.Popen(list(command), env=dict(env), process_group=0)
        relay.send_pending()  # a stop that came while it was starting
        return relay.child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if leftover := stop_recorded_haproxy(pid_dir):
            print(f"llmserve: stopped haproxy {leftover} left running after serve run", file=sys.stderr)


class _Relay:
    """Counts stop signals and sends the child one escalation step for each, in order, once."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.num_received = 0
        self.num_sent = 0

    def on_signal(self, signum: int, frame: object) -> None:
        self.num_received += 1
        self.send_pending()

    def send_pending(self) -> None:
        while self.child is not None and self.num_sent < self.num_received:
            sig = _ESCALATION[min(self.num_sent, len(_ESCALATION) - 1)]
            self.num_sent += 1
            with contextlib.suppress(ProcessLookupError):
                if sig == signal.SIGKILL:
                    os.killpg(self.child.pid, sig)
                else:
                    self.child.send_signal(sig)


def stop_recorded_haproxy(pid_dir: Path, timeout_s: float = HAPROXY_STOP_TIMEOUT_S) -> list[int]:
    """SIGTERM every recorded haproxy still running (SIGKILL after `timeout_s`); returns their pids."""
    pids = [pid for pid in _recorded_pids(pid_dir) if _is_haproxy(pid)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while (running := [pid for pid in pids if _is_haproxy(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in running:
        _signal(pid, signal.SIGKILL)
    return pids


def _recorded_pids(pid_dir: Path) -> list[int]:
    try:
        return sorted(int(p.name) for p in pid_dir.iterdir() if p.name.isdigit())
    except FileNotFoundError:
        return []


def _is_haproxy(pid: int) -> bool:
    """Whether `pid` is a live haproxy (not a zombie, not a reused pid of another program)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return os.path.basename(argv0) == b"haproxy" and state != "Z"


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
