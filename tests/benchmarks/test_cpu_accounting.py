"""serve_bench's CPU accounting (benchmarks/cpu_accounting.py): a process that burns CPU between two
snapshots is found, named and charged per output token; one that sleeps is charged nothing."""

import subprocess
import sys
import time

from benchmarks.cpu_accounting import TABLE_HEADER, between, snapshot

# Each child says on stdout when it is where the test needs it (an event, not a guess of how long a
# busy machine takes): the sleeper once started, the burner once its 0.6 s of CPU are spent.
_SLEEP = "import sys, time\nprint('asleep', flush=True)\ntime.sleep(60)"
_BURN = (
    "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
    "print('burnt', flush=True)\ntime.sleep(60)"
)


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _wait_for(child: subprocess.Popen, says: str) -> None:
    assert child.stdout is not None and child.stdout.readline().strip() == says


def test_a_busy_process_is_charged_its_cpu_and_a_sleeping_one_nothing():
    sleeper = _start(_SLEEP)
    burner = None
    try:
        _wait_for(sleeper, "asleep")  # its start-up CPU lands before the first snapshot
        before = snapshot()
        burner = _start(_BURN)
        _wait_for(burner, "burnt")
        use = between(before, snapshot(), output_tokens=300)
    finally:
        for child in (sleeper, burner):
            if child is not None:
                child.kill()
                child.wait()
    by_pid = {p.pid: p for p in use.processes}
    assert sleeper.pid not in by_pid or by_pid[sleeper.pid].cpu_s < 0.05
    busy = by_pid[burner.pid]  # a process started in between counts from 0
    assert busy.label.startswith("python")
    assert 0.55 <= busy.cpu_s <= 0.9
    assert abs(busy.core_share - busy.cpu_s / use.wall_s) < 1e-9
    assert abs(busy.ms_per_token - 1e3 * busy.cpu_s / 300) < 1e-9
    assert [p.cpu_s for p in use.processes] == sorted((p.cpu_s for p in use.processes), reverse=True)
    assert 0.0 <= use.idle_share <= 1.0


def test_rows_show_the_top_processes_the_rest_summed_and_the_idle_share():
    before = snapshot()
    time.sleep(0.01)  # any interval: only the table's shape is checked
    use = between(before, snapshot(), output_tokens=10)
    rows = use.rows("concurrency 1", top=1)
    assert len(TABLE_HEADER.splitlines()) == 2
    assert all(row.startswith("| concurrency 1 | ") and row.count("|") == 5 for row in rows)
    assert "machine idle" in rows[-1]
    assert len(rows) == min(len(use.processes), 1) + (len(use.processes) > 1) + 1
