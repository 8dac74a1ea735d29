"""Compiling guided-decoding constraints off the engine thread, on a few worker threads.

A compile is bounded by llguidance's own limits (lexer fuel, grammar size, Earley items: it ends with
an error rather than run on), and a request waits for its compile at most `timeout_s` once a worker
has started it (then 400: its constraint is too costly); time spent queued behind other compiles does
not count against it. A thread cannot be stopped, so a compile that outlives its request keeps its
worker until llguidance returns: it is "abandoned". When every worker holds an abandoned compile, a
new one is refused at once with 503 naming the reason, instead of queueing behind compiles nobody
waits for (and then being blamed with a 400).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from engine.errors import InvalidRequestError, ModelUnavailableError
from engine.guided import CompiledGuide, GuidedSpec

Compile = Callable[[GuidedSpec], CompiledGuide]


@dataclass(slots=True)
class _Job:
    is_finished: bool = False  # the worker returned from it
    is_abandoned: bool = False  # its request stopped waiting while the worker was still busy with it


class GuideCompilePool:
    def __init__(self, compile_fn: Compile, num_workers: int = 2, timeout_s: float = 10.0) -> None:
        self._compile = compile_fn
        self._num_workers, self._timeout_s = num_workers, timeout_s
        self._executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="guide-compile")
        self._lock = threading.Lock()
        self._num_abandoned = 0  # workers busy with a compile nobody waits for any more

    @property
    def num_abandoned(self) -> int:
        return self._num_abandoned

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on a worker (start-up work, e.g. building the compiler)."""
        return self._executor.submit(fn)

    async def compile(self, spec: GuidedSpec) -> CompiledGuide:
        """The compiled guide; InvalidRequestError (400) for a bad constraint or one whose compile ran
        past the timeout, ModelUnavailableError (503) when every worker holds an abandoned compile."""
        with self._lock:
            if self._num_abandoned >= self._num_workers:
                raise ModelUnavailableError(
                    f"guided decoding: all {self._num_workers} compile workers are busy with constraints "
                    "that ran past their compile limit (their requests were refused); try again shortly"
                )
        loop, job = asyncio.get_running_loop(), _Job()
        started = asyncio.Event()
        on_start = lambda: loop.call_soon_threadsafe(started.set)  # noqa: E731
        done = loop.run_in_executor(self._executor, self._run, job, spec, on_start)
        await started.wait()  # queued behind other compiles: not this constraint's time
        try:
            return await asyncio.wait_for(asyncio.shield(done), self._timeout_s)
        except TimeoutError:
            with self._lock:
                if not job.is_finished:
                    job.is_abandoned = True
                    self._num_abandoned += 1
            raise InvalidRequestError(
                f"guided decoding: compiling the constraint took over {self._timeout_s:g} s; "
                "simplify the schema, regex or grammar"
            ) from None

    def _run(self, job: _Job, spec: GuidedSpec, on_start: Callable[[], Any]) -> CompiledGuide:
        on_start()
        try:
            return self._compile(spec)
        finally:
            with self._lock:
                job.is_finished = True
                if job.is_abandoned:
                    self._num_abandoned -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
