"""AsyncEngine: the asyncio face of the engine. One dedicated thread runs every model step.

torch's inference mode and thread settings are per thread, and stepping a model from several threads
crashes under load, so all model work happens on `_loop_thread`; asyncio code only moves requests in
and deltas out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.core import EngineCore
from engine.device import default_num_threads
from engine.errors import (
    EngineDeadError,
    OverloadedError,
    RequestFailedError,
    ServingError,
)
from engine.guided import CompiledGuide, GuidedCompiler
from engine.guided_pool import GuideCompilePool
from engine.guided_spec import GuidedSpec
from engine.refill import RefillPolicy
from engine.types import EngineConfig, EngineStats, GenerationRequest, TokenDelta

logger = logging.getLogger("engine")
NUM_COMPILE_WORKERS = 2  # guided-decoding compiles at once, off the engine thread (engine/guided_pool.py)


class RequestStream:
    """One request's output channel: the items (deltas, or the error that ends it) of each engine step.

    The serving path (deployments/served_stream.py) reads it with `next_items` / `ready_items` and
    ends it with `close`, which only stops listening: the serving stream sends the one abort itself.
    Direct callers (tests, benchmarks) iterate it delta by delta and `aclose` it, which aborts an
    unfinished request.
    """

    def __init__(self, engine: AsyncEngine, request_id: str, out: asyncio.Queue) -> None:
        self.request_id = request_id
        self._engine, self._out = engine, out
        self._pending: deque = deque()  # per-delta iteration only
        self._is_finished = self._is_closed = False

    async def next_items(self) -> list[TokenDelta | BaseException]:
        """The next step's items for this request, waiting for that step (cancel-safe)."""
        return await self._out.get()

    def ready_items(self) -> list[TokenDelta | BaseException]:
        """Every item delivered and not yet taken, without waiting (`[]` if none)."""
        items: list[TokenDelta | BaseException] = []
        while not self._out.empty():
            items.extend(self._out.get_nowait())
        return items

    def close(self) -> None:
        """Idempotent: stop listening. It does not abort (the caller decides that)."""
        if not self._is_closed:
            self._is_closed = True
            self._engine._forget(self.request_id)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._is_finished or self._is_closed:
            raise StopAsyncIteration
        while not self._pending:
            self._pending.extend(await self._out.get())
        item = self._pending.popleft()
        if isinstance(item, TokenDelta) and item.error is not None:
            item = item.error  # this request failed in the engine; the others go on
        if isinstance(item, BaseException) or item.is_finished:
            self._is_finished = True
            self.close()
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        """Idempotent; aborts the request unless it already finished."""
        if not self._is_finished and not self._is_closed:
            self._engine.abort(self.request_id)
        self.close()


@dataclass(frozen=True, slots=True)
class _Add:
    request: GenerationRequest
    guide: CompiledGuide | None = None
    sent_s: float = field(default_factory=time.monotonic)  # when its caller queued it


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


Loader = Callable[[], tuple[Any, Any]]  # () -> (transformers causal LM on its device, tokenizer)


class AsyncEngine:
    def __init__(self, model, tokenizer, config: EngineConfig, device: torch.device | None = None) -> None:
        """Serve an already loaded model; prefer `from_loader`, which also loads on the engine thread."""
        self._start(lambda: (model, tokenizer), config, device)

    @classmethod
    def from_loader(
        cls, load: Loader, config: EngineConfig, device: torch.device | None = None
    ) -> AsyncEngine:
        """Start the engine thread and load the model on it; returns once the engine is ready."""
        engine = cls.__new__(cls)
        engine._start(load, config, device)
        return engine

    def _start(self, load: Loader, config: EngineConfig, device: torch.device | None) -> None:
        # All torch work, loading included, happens on one thread: with libgomp, OpenMP regions run
        # on a second thread while the first one's team lives are ~2-3x slower (measured here).
        self.config = config
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # guards _streams and _dead
        self._wakeup = threading.Event()
        self._refill = RefillPolicy(config.refill_wait_ms / 1000)  # engine thread only
        self._refill_hold_time_s = 0.0  # since start, written by the engine thread only
        self._dead: EngineDeadError | None = None  # set once, when the engine loop ends for any reason
        self._guides = GuideCompilePool(self._compile, NUM_COMPILE_WORKERS, config.guided_compile_timeout_s)
        self._compiler: GuidedCompiler | None = None
        self._compiler_lock = threading.Lock()
        self._background: set[asyncio.Future] = set()
        started: Future[EngineCore] = Future()
        self._thread = threading.Thread(
            target=self._loop_thread, args=(load, device, started), name="engine-loop", daemon=True
        )
        self._thread.start()
        self.core = started.result()  # re-raises a loading error here
        self.device = self.core.device
        # The guided-decoding compiler walks the whole vocabulary (~0.4 s): build it now, beside the
        # idle engine, rather than on the first guided request's path.
        self._guides.submit(self._guided_compiler).add_done_callback(_log_failure)

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.core.vocab_size

    def check_request(self, num_prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ContextLengthError (HTTP 400, with the numbers) if it can never fit."""
        self.core.check_request(num_prompt_tokens, max_new_tokens)

    def add_request(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its stream carries its deltas, the last one with a finish_reason.

        Refusals (context length, full queue, dead engine) raise here, before any iteration.
        """
        # The serving side (deployments/model_server.py) validated and normalized the request; the
        # context check here only keeps a direct caller's impossible request out of the queue.
        self.check_request(len(request.prompt_token_ids), request.params.max_new_tokens)
        out: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._dead is not None:
                raise self._dead
            if len(self._streams) >= self.config.max_num_seqs + self.config.max_waiting:
                raise OverloadedError(
                    f"the model is overloaded: {len(self._streams)} requests in flight; try again later"
                )
            if request.request_id in self._streams:
                raise ValueError(f"duplicate request id {request.request_id}")
            self._streams[request.request_id] = (asyncio.get_running_loop(), out)
        if request.params.guided is None:
            self._send(_Add(request))
        else:  # compile off the engine thread; errors reach the stream before its first delta
            self._background.add(asyncio.ensure_future(self._compile_and_add(request)))
        return RequestStream(self, request.request_id, out)

    async def _compile_and_add(self, request: GenerationRequest) -> None:
        spec = request.params.guided
        try:
            cached = self._compiler.cached(spec) if self._compiler is not None else None
            guide = cached or await self._guides.compile(spec)
        except ServingError as exc:  # 400: a bad or too costly constraint; 503: every worker busy
            self._deliver_error(request.request_id, exc)
        except Exception as exc:  # a library failure, not the request's fault: still end the request
            logger.exception("guided decoding: compiling failed")
            self._deliver_error(request.request_id, ServingError(f"guided decoding failed: {exc}"))
        else:
            with self._lock:
                is_listening = request.request_id in self._streams
            if is_listening:  # the caller may have gone while it compiled
                self._send(_Add(request, guide))
        finally:
            self._background = {t for t in self._background if not t.done()}

    def _guided_compiler(self) -> GuidedCompiler:
        """Built once, in the compile pool, right after start-up; a request arriving earlier waits here."""
        with self._compiler_lock:
            if self._compiler is None:
                core = self.core
                self._compiler = GuidedCompiler(core.tokenizer, core.vocab_size, core.eos_token_ids)
            return self._compiler

    def _compile(self, spec: GuidedSpec) -> CompiledGuide:
        """Runs on a compile worker."""
        return self._guided_compiler().compile(spec)

    def abort(self, request_id: str) -> None:
        """Stop a request; its batch slot and cache are freed at the next step."""
        self._send(_Abort(request_id))

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def stats(self) -> EngineStats:
        sched, steps = self.core.scheduler, self.core.step_totals
        return EngineStats(
            len(sched.running),
            len(sched.waiting),
            sched.kv_cache_usage,
            self.max_model_len,
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=sched.allocator.num_queries,
            prefix_cache_hits=sched.allocator.num_hits,
            num_decode_steps=steps.num_decode_steps,
            num_prefill_steps=steps.num_prefill_steps,
            decode_step_time_s=steps.decode_step_time_s,
            prefill_step_time_s=steps.prefill_step_time_s,
            refill_hold_time_s=self._refill_hold_time_s,
        )

    def check_health(self) -> None:
        """Raise EngineDeadError once the compute thread has stopped."""
        if self._dead is not None:
            raise self._dead
        if not self._thread.is_alive():
            raise EngineDeadError("the engine thread has stopped")

    def shutdown(self) -> None:
        self._guides.shutdown()
        self._send(None)
        self._thread.join(timeout=10)

    def _send(self, message: _Add | _Abort | None) -> None:
        self._inbox.put(message)
        self._wakeup.set()

    # ---- everything below runs on the engine thread ----

    def _loop_thread(self, load: Loader, device: torch.device | None, started: Future) -> None:
        torch.set_num_threads(self.config.num_threads or default_num_threads())
        try:
            with torch.inference_mode():
                model, tokenizer = load()
                device = device or next(model.parameters()).device
                self.core = EngineCore(model, tokenizer, self.config, device)
        except BaseException as exc:
            started.set_exception(exc)
            return
        started.set_result(self.core)
        reason: BaseException = EngineDeadError("the engine was shut down")
        try:
            with torch.inference_mode():
                self._run_steps()
        except BaseException as exc:  # whatever ends the loop is recorded and ends every stream
            logger.exception("the engine loop died")
            reason = exc
        finally:
            self._die(reason)

    def _run_steps(self) -> None:
        """Step until shut down. A failed step fails the requests in it; EngineDeadError ends the loop."""
        last_step: tuple[float, int] | None = None  # (when the last step ended, requests it finished)
        while True:
            if not self.core.has_unfinished:
                self._wakeup.wait()
            self._wakeup.clear()
            if not self._drain_inbox():
                return
            if last_step is not None:
                self._refill.on_step(*last_step)
                last_step = None
                if not self._wait_for_refills():
                    return
            try:
                deltas = self.core.step()
            except EngineDeadError:
                raise
            except Exception as exc:  # outside the core's own isolation: fail the step's requests
                logger.exception("engine step failed")
                self._fail_all(exc)
                continue
            # the step's end is read before its deltas go out: a client's next request, sent once it has
            # its finish, is then always sent after the step ended (a refill), however late this thread
            # gets the core back after handing the deltas over
            last_step = (time.monotonic(), sum(1 for delta in deltas if delta.is_finished))
            self._deliver(deltas)

    def _wait_for_refills(self) -> bool:
        """Hold the next step while the refill policy says (engine/refill.py); False when shut down."""
        held_from: float | None = None
        try:
            while True:
                scheduler = self.core.scheduler
                until = self._refill.hold_until(
                    num_running=len(scheduler.running), num_waiting=len(scheduler.waiting)
                )
                if until is None or (left := until - time.monotonic()) <= 0:
                    return True
                held_from = held_from or time.monotonic()
                if self._inbox.empty():
                    self._wakeup.wait(left)
                self._wakeup.clear()
                if not self._drain_inbox():
                    return False
        finally:
            if held_from is not None:
                self._refill_hold_time_s += time.monotonic() - held_from

    def _die(self, reason: BaseException) -> None:
        """Record why the engine stopped and end every open stream (queued, compiling or running) with it."""
        detail = str(reason) if isinstance(reason, EngineDeadError) else repr(reason)
        error = EngineDeadError(f"the model's engine has stopped ({detail}); the replica is being replaced")
        with self._lock:
            self._dead = error
            request_ids = list(self._streams)
        with contextlib.suppress(Exception):
            self.core.abort_all()
        self._send_out({request_id: [error] for request_id in request_ids})

    def _drain_inbox(self) -> bool:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if message is None:
                return False
            if isinstance(message, _Abort):
                delta = self.core.abort(message.request_id)
                if delta is not None:
                    self._deliver([delta])
                continue
            self._refill.on_arrival(message.sent_s)
            try:
                self.core.add_request(message.request, message.guide)
            except ServingError as exc:
                self._deliver_error(message.request.request_id, exc)
            except Exception as exc:  # a bug, but one request's: it must not end the loop
                logger.exception("adding request %s failed", message.request.request_id)
                error = RequestFailedError(f"adding the request failed: {exc}")
                self._deliver_error(message.request.request_id, error)

    def _deliver(self, deltas: list[TokenDelta]) -> None:
        by_request: dict[str, list] = {}
        for delta in deltas:
            by_request.setdefault(delta.request_id, []).append(delta)
        self._send_out(by_request)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        self._send_out({request_id: [exc]})

    def _send_out(self, by_request: dict[str, list]) -> None:
        """One wake-up per event loop and step, not one per request: the loop thread shares the GIL."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, list]]] = {}
        with self._lock:
            for request_id, items in by_request.items():
                target = self._streams.get(request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], items))
        for loop, batch in by_loop.items():
            # RuntimeError: that event loop is closed, so nobody is listening any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, batch)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in self.core.abort_all():
            error = exc if isinstance(exc, ServingError) else RequestFailedError(f"generation failed: {exc}")
            self._deliver_error(request_id, error)


def _log_failure(future: Future) -> None:
    if future.exception() is not None:
        logger.error("building the guided-decoding compiler failed: %r", future.exception())


def _put_all(batch: list[tuple[asyncio.Queue, list]]) -> None:
    for out, items in batch:
        out.put_nowait(items)
