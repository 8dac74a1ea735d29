"""The Ray Data UDF of a batch job: one actor = one engine worker, running the project's engine in-process.

Each call gets a Ray Data batch of rows (`index`, `payload`) and sends all of them to the engine at
once, so continuous batching packs them into shared forward passes. A failing row becomes an error
record; the others complete. The worker lowers its OS priority first (`nice`), so online replicas on
the same node win the CPU when both want it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import threading
from typing import Any

import numpy as np

from deployments.batch.rows import RowParser, render_error, render_result
from deployments.batch.types import JobKind
from deployments.config import ModelConfig
from deployments.limits import LimitSettings
from deployments.model_server import EngineFactory, ModelServer

logger = logging.getLogger("ray.data")


def lower_priority(nice: int, is_idle: bool) -> None:
    """Batch yields the CPU to online replicas sharing the node: a higher niceness (Ray starts workers at
    15, so +10 reaches the maximum, 19), or SCHED_IDLE where Linux offers it."""
    if nice:
        os.nice(nice)
    if is_idle and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class EngineWorker:
    """`ds.map_batches(EngineWorker, concurrency=data_parallelism, fn_constructor_kwargs=...)`."""

    def __init__(
        self,
        kind: str,
        model_config_json: str,
        v1_content_json: str | None,
        nice: int,
        num_threads: int | None,
        is_idle: bool = False,
        limits_json: str | None = None,
        engine_factory: str | None = None,
    ) -> None:
        lower_priority(nice, is_idle)  # before the engine's threads start: they inherit it
        config = ModelConfig.model_validate_json(model_config_json)
        if num_threads is not None:
            config = config.model_copy(
                update={"engine": config.engine.model_copy(update={"num_threads": num_threads})}
            )
        self._kind = JobKind(kind)
        self._model = config.name
        # Its own metrics label, so batch load does not show up as the online model's.
        batch_config = config.model_copy(update={"name": f"{config.name}-batch"})
        self._server = ModelServer(batch_config, _import_factory(engine_factory))
        v1_content = json.loads(v1_content_json) if v1_content_json else None
        limits = LimitSettings.model_validate_json(limits_json) if limits_json else LimitSettings()
        self._parser = RowParser(self._kind, config.name, v1_content, limits)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()  # one loop for the worker's life: the engine's streams use it
        self.worker_id = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        indexes = [int(i) for i in batch["index"]]
        payloads = [str(p) for p in batch["payload"]]
        with self._lock:  # Ray Data calls from a thread pool; the loop runs on one thread at a time
            records = self._loop.run_until_complete(self._run_rows(indexes, payloads))
        outputs = [json.dumps(out) if out is not None else "" for out, _ in records]
        errors = [json.dumps(err) if err is not None else "" for _, err in records]
        return {
            "index": np.array(indexes, dtype=np.int64),
            "output": np.array(outputs, dtype=object),
            "error": np.array(errors, dtype=object),
            "worker": np.array([self.worker_id] * len(indexes), dtype=object),
        }

    async def _run_rows(
        self, indexes: list[int], payloads: list[str]
    ) -> list[tuple[dict | None, dict | None]]:
        """Every row at once: the engine's continuous batching packs them into shared steps."""
        return await asyncio.gather(*(self._run_row(i, p) for i, p in zip(indexes, payloads, strict=True)))

    async def _run_row(self, index: int, payload: str) -> tuple[dict | None, dict | None]:
        try:
            row = self._parser.parse(index, payload)
            result = await self._server.generate(row.request)
            return render_result(self._kind, self._model, row, result), None
        except Exception as exc:  # one bad row fails alone: it goes to the error records
            return None, render_error(self._kind, index, payload, exc)


def _import_factory(path: str | None) -> EngineFactory | None:
    """The app's engine factory by its "module:function" name (set only where the app is built in Python)."""
    if path is None:
        return None
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
