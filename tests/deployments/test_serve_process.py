"""How `llmserve serve` stops `serve run` (deployments/serve_process.py), with stand-ins for both programs.

A stand-in `serve run` records each signal it gets; a stand-in haproxy is a `sleep` named haproxy
whose pid the test records where `llmserve-haproxy` would. Each test waits on events (a line in a
file, a process's exit), never on the clock for its verdict.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.serve_process import stop_recorded_haproxy

# Records SIGINT/SIGTERM in its log; exits on the signal named by its second argument. Like `serve run`
# (Python's KeyboardInterrupt), it catches SIGINT only if SIGINT was not ignored when it started. It
# writes with os.write: a signal handler that writes to a buffered file can land inside the "ready"
# line's write to it and fail as a reentrant call.
FAKE_SERVE_RUN = textwrap.dedent(
    """
    import os, signal, sys, time
    log, exit_on = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND), sys.argv[2]
    def record(signum, frame):
        name = signal.Signals(signum).name
        os.write(log, (name + "\\n").encode())
        if name == exit_on:
            sys.exit(3)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, record)
    signal.signal(signal.SIGTERM, record)
    os.write(log, f"ready {os.getpid()}\\n".encode())
    while True:
        time.sleep(0.05)
    """
)
# `llmserve serve`'s supervision of argv[2:], with the pid folder argv[1].
SUPERVISOR = (
    "import sys; from pathlib import Path; from deployments.serve_process import run_supervised; "
    "sys.exit(run_supervised(sys.argv[2:], {}, Path(sys.argv[1])))"
)
WAIT_S = 30  # a bound on each wait, so that a broken relay fails instead of hanging


def wait_for_lines(log: Path, num_lines: int) -> list[str]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= num_lines:
            return lines
        time.sleep(0.02)
    raise AssertionError(f"{log}: fewer than {num_lines} lines: {log.read_text() if log.exists() else ''}")


def fake_haproxy(*, ignore_sigterm: bool = False) -> subprocess.Popen:
    """A process named haproxy (its argv[0]), once it runs as such."""
    code = "import signal as s, time; s.signal(s.SIGTERM, s.SIG_IGN); print(flush=True); time.sleep(600)"
    program = f"{sys.executable} -c '{code}'" if ignore_sigterm else "sleep 600"
    process = subprocess.Popen(["bash", "-c", f"exec -a haproxy {program}"], stdout=subprocess.PIPE)
    if ignore_sigterm:
        process.stdout.readline()  # its handler is set
    deadline = time.monotonic() + WAIT_S
    while not Path(f"/proc/{process.pid}/cmdline").read_bytes().startswith(b"haproxy\0"):
        assert time.monotonic() < deadline, "the stand-in haproxy did not start"
        time.sleep(0.01)
    return process


@pytest.fixture
def started() -> Iterator[list[int]]:
    """Pids whose process groups are killed after the test, should a broken relay leave them running."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def supervise(
    tmp_path: Path, started: list[int], exit_on: str, *, ignore_sigint: bool = False
) -> tuple[subprocess.Popen, Path]:
    script, log, pids = tmp_path / "serve_run.py", tmp_path / "signals.log", tmp_path / "pids"
    script.write_text(FAKE_SERVE_RUN)
    pids.mkdir()
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(pids), sys.executable, str(script), str(log), exit_on],
        # as a shell's background job starts it: SIGINT ignored, which a child would inherit
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
        process_group=0,
    )
    started.append(supervisor.pid)
    started.append(int(wait_for_lines(log, 1)[0].split()[1]))  # the stand-in serve run's own group
    return supervisor, log


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_one_stop_signal_reaches_serve_run_once_as_sigint(tmp_path, started, stop):
    supervisor, log = supervise(tmp_path, started, exit_on="SIGINT", ignore_sigint=True)
    supervisor.send_signal(stop)
    assert supervisor.wait(timeout=WAIT_S) == 3  # serve run's exit status
    assert log.read_text().splitlines()[1:] == ["SIGINT"]


def test_a_second_signal_becomes_sigterm(tmp_path, started):
    supervisor, log = supervise(tmp_path, started, exit_on="SIGTERM")
    supervisor.send_signal(signal.SIGTERM)
    wait_for_lines(log, 2)
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=WAIT_S) == 3
    assert log.read_text().splitlines()[1:] == ["SIGINT", "SIGTERM"]


def test_a_recorded_haproxy_left_running_is_stopped_when_serve_run_ends(tmp_path, started):
    haproxy, stranger = fake_haproxy(), subprocess.Popen(["sleep", "600"])
    try:
        supervisor, _ = supervise(tmp_path, started, exit_on="SIGINT")
        for process in (haproxy, stranger):  # a reused pid of another program is left alone
            (tmp_path / "pids" / str(process.pid)).touch()
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=WAIT_S) == 3
        assert haproxy.wait(timeout=WAIT_S) == -signal.SIGTERM
        assert stranger.poll() is None
    finally:
        for process in (haproxy, stranger):
            process.kill()
            process.wait()


def test_a_haproxy_that_ignores_sigterm_is_killed(tmp_path):
    stubborn = fake_haproxy(ignore_sigterm=True)
    try:
        (tmp_path / str(stubborn.pid)).touch()
        assert stop_recorded_haproxy(tmp_path, timeout_s=0.5) == [stubborn.pid]
        assert stubborn.wait(timeout=WAIT_S) == -signal.SIGKILL
    finally:
        stubborn.kill()
        stubborn.wait()


def test_nothing_recorded_nothing_stopped(tmp_path):
    assert stop_recorded_haproxy(tmp_path / "none") == []
    assert stop_recorded_haproxy(tmp_path) == []
