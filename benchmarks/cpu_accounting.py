"""Where a benchmark level's CPU went, process by process (psutil; this machine's processes only).

`snapshot()` before and after a level; `CpuUse.rows()` gives each process's CPU seconds over the
level as a share of one core and as CPU milliseconds per output token, largest first. Ray workers are
named by their process title (`ray::ServeReplica:llm:Ingress`), other processes by their executable
and script, so that the serving side's cost per token can be read next to the engine's and a peer's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True, slots=True)
class Snapshot:
    wall_s: float
    idle_s: float  # the machine's idle time, all cores
    cpu_s: dict[int, tuple[str, float]]  # pid -> (label, user + system seconds)


@dataclass(frozen=True, slots=True)
class ProcessUse:
    pid: int
    label: str
    cpu_s: float
    core_share: float  # CPU seconds / wall seconds: 1.0 = one core busy all the level
    ms_per_token: float


@dataclass(frozen=True, slots=True)
class CpuUse:
    wall_s: float
    idle_share: float  # of the whole machine (all cores)
    processes: list[ProcessUse]

    def rows(self, label: str, top: int) -> list[str]:
        """Markdown rows: the `top` largest processes and the rest summed."""
        shown, rest = self.processes[:top], self.processes[top:]
        rows = [f"| {label} | {p.label} | {100 * p.core_share:.1f} | {p.ms_per_token:.2f} |" for p in shown]
        if rest:
            share, ms = sum(p.core_share for p in rest), sum(p.ms_per_token for p in rest)
            rows.append(f"| {label} | {len(rest)} other processes | {100 * share:.1f} | {ms:.2f} |")
        idle = f"(machine idle, % of all {psutil.cpu_count()} cores)"
        rows.append(f"| {label} | {idle} | {100 * self.idle_share:.1f} | |")
        return rows


TABLE_HEADER = "| load | process | CPU % of one core | CPU ms per output token |\n|---|---|---|---|"


def _label(proc: psutil.Process, own_pid: int) -> str:
    if proc.pid == own_pid:
        return "this benchmark process"
    cmdline = proc.cmdline()
    if cmdline and cmdline[0].startswith("ray::"):  # the title Ray sets
        title = " ".join(cmdline).strip()
        # ray::ServeReplica:<app>:<deployment>; an actor without one: ray::<class>.<running method>
        return (title if ":" in title.removeprefix("ray::") else title.split(".")[0])[:70]
    name = proc.name()
    scripts = [os.path.basename(a) for a in cmdline[1:3] if a.endswith(".py") or "vllm" in a]
    return " ".join([name, *scripts])[:70]


def snapshot() -> Snapshot:
    cpu_s: dict[int, tuple[str, float]] = {}
    own_pid = os.getpid()
    for proc in psutil.process_iter():
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                cpu_s[proc.pid] = (_label(proc, own_pid), times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return Snapshot(time.perf_counter(), psutil.cpu_times().idle, cpu_s)


def between(before: Snapshot, after: Snapshot, output_tokens: int) -> CpuUse:
    """What each process used from `before` to `after` (processes that started in between count from 0)."""
    wall_s = after.wall_s - before.wall_s
    uses = []
    for pid, (label, seconds) in after.cpu_s.items():
        used = seconds - before.cpu_s.get(pid, (label, 0.0))[1]
        if used > 0:
            uses.append(ProcessUse(pid, label, used, used / wall_s, 1e3 * used / max(output_tokens, 1)))
    uses.sort(key=lambda p: p.cpu_s, reverse=True)
    idle_share = (after.idle_s - before.idle_s) / (wall_s * (psutil.cpu_count() or 1))
    return CpuUse(wall_s, max(0.0, idle_share), uses)
