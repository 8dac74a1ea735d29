"""serve_bench's CPU accounting (benchmarks/cpu_accounting.py): a process that burns CPU between two
snapshots is found, named and charged per output token; one that sleeps is charged nothing."""

import subprocess
import sys
import time

from benchmarks.cpu_accounting import TABLE_HEADER, between, snapshot

_BURN = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(30)"


def test_a_busy_process_is_charged_its_cpu_and_a_sleeping_one_nothing():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(1.0)  # its start-up CPU lands before the first snapshot
    try:
        before = snapshot()
        burner = subprocess.Popen([sys.executable, "-c", _BURN])
        time.sleep(2.5)  # 0.6 s of CPU, then asleep: done even on a busy 2-core machine
        use = between(before, snapshot(), output_tokens=300)
    finally:
        for child in (sleeper, burner):
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
    time.sleep(0.3)
    use = between(before, snapshot(), output_tokens=10)
    rows = use.rows("concurrency 1", top=1)
    assert len(TABLE_HEADER.splitlines()) == 2
    assert all(row.startswith("| concurrency 1 | ") and row.count("|") == 5 for row in rows)
    assert "machine idle" in rows[-1]
    assert len(rows) == min(len(use.processes), 1) + (len(use.processes) > 1) + 1
