"""AsyncEngine: the engine's step loop on its own thread, with an asyncio face.

Boundary: the engine is single-threaded and never touched from the event loop.
Everything that reads or changes it (adding a request, aborting one, loading
an adapter, taking a metrics snapshot) is a command run on the engine thread
between steps; results come back through futures the event loop awaits, and
outputs through one asyncio queue per request. The event loop never blocks on
a step, and a step never waits for a slow client.

The thread cannot die silently: an exception anywhere on it (a step, a
command, the per-step callback) stops the engine as a failed step does
(`LLMEngine.die`): every request ends, every stream gets the error, and the
thread stays up to answer commands (refusing new work with the cause), so
nothing awaiting it hangs. `shutdown` fails every call and stream still
pending.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from loramux.engine.llm_engine import EngineDeadError, LLMEngine, sample_ids
from loramux.engine.outputs import RequestOutput
from loramux.sampling_params import SamplingParams

logger = logging.getLogger("loramux.server")
T = TypeVar("T")


class AsyncEngine:
    def __init__(
        self, engine: LLMEngine, on_step: Callable[[list[RequestOutput]], None] | None = None
    ) -> None:
        self.engine = engine
        self.on_step = on_step
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._calls: set[concurrent.futures.Future[Any]] = set()  # awaited, not yet run
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)

    # --- lifecycle ---
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The engine thread runs and no step has failed."""
        return self._thread.is_alive() and self.engine.dead is None

    def shutdown(self) -> None:
        """Stop the thread; every call and stream still pending fails with EngineDeadError."""
        self._stop.set()
        self._commands.put(lambda: None)  # wake the thread
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        gone = EngineDeadError("the engine was shut down (the server is stopping); retry elsewhere")
        for fut in list(self._calls):
            if fut.set_running_or_notify_cancel():
                fut.set_exception(gone)
        self._calls.clear()
        self._end_streams(gone)
        if self.engine.kv_publisher is not None:
            self.engine.kv_publisher.close()
        if self.engine.step_log is not None:
            self.engine.step_log.close()

    # --- the engine thread ---
    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            try:
                idle = not engine.has_unfinished_requests()
                try:  # every command waiting (while idle, wait a little for one), then a step
                    cmd = self._commands.get(timeout=0.5) if idle else self._commands.get_nowait()
                    while True:
                        cmd()
                        cmd = self._commands.get_nowait()
                except queue.Empty:
                    pass
                if engine.has_unfinished_requests():
                    self._step()
            except Exception as e:  # a bug outside the step: stop as a failed step does, loudly
                logger.exception("error on the engine thread")
                self._stop_engine(engine.die(e, "an error on the engine thread"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineDeadError as err:  # the engine ended every request; tell their streams why
            self._stop_engine(err)
            return
        if self.on_step is not None:
            self.on_step(outputs)
        for out in outputs:
            self._deliver(out.request_id, out)

    def _stop_engine(self, err: EngineDeadError) -> None:
        logger.error("engine stopped; ending %d streams: %s", len(self._streams), err, exc_info=err.__cause__)
        self._end_streams(err)

    def _end_streams(self, err: BaseException) -> None:
        for rid in list(self._streams):
            self._deliver(rid, err)

    def _deliver(self, rid: str, item: Any) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, q = target
            if loop.is_closed():  # its server's loop is gone (shutdown): nobody is listening
                self._streams.pop(rid, None)
                return
            loop.call_soon_threadsafe(q.put_nowait, item)

    # --- the asyncio side ---
    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the engine thread between steps and await its result."""
        if self._stop.is_set():
            raise EngineDeadError("the engine was shut down (the server is stopping); retry elsewhere")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def command() -> None:
            self._calls.discard(fut)
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting coroutine
                fut.set_exception(e)

        self._calls.add(fut)
        self._commands.put(command)
        return await asyncio.wrap_future(fut)

    async def prepare(self, params: SamplingParams) -> None:
        """Compile the request's grammar, if it has one, without holding up the engine thread
        (cached by spec); raises ValueError naming the problem if it cannot be compiled."""
        if params.structured_outputs is not None:
            await asyncio.wrap_future(self.engine.grammar_future(params.structured_outputs))

    async def add_request_n(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        lora_name: str | None = None,
        tenant: str = "",
        fill_max_tokens: bool = False,
        cache_salt: str | None = None,
        priority: int = 0,
    ) -> list[RequestStream]:
        """Queue `params.n` samples of one prompt (LLMEngine.add_request_n); bad input raises here
        (ValueError, AdapterNotFoundError, QueueFullError, EngineDeadError).

        Returns one output stream per sample. Closing a stream before it finishes (the client went
        away, the handler was cancelled) aborts that request and frees its pages at once.
        """
        ids = sample_ids(request_id, params.n)
        taken = next((rid for rid in ids if rid in self._streams), None)
        if taken is not None:  # refused before its stream could replace the running request's
            raise ValueError(
                f"request id {taken!r} is in use by an unfinished request; give each request its own id"
            )
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[Any]] = []
        for rid in ids:
            q: asyncio.Queue[Any] = asyncio.Queue()
            self._streams[rid] = (loop, q)
            queues.append(q)
        try:
            await self.call(
                self.engine.add_request_n,
                request_id,
                prompt,
                params,
                lora_name,
                tenant,
                fill_max_tokens,
                cache_salt,
                priority,
            )
        except BaseException:
            for rid in ids:
                self._streams.pop(rid, None)
            raise
        return [RequestStream(self, rid, q) for rid, q in zip(ids, queues, strict=True)]

    async def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, *args: Any
    ) -> RequestStream:
        """One request (n=1) and its stream; see add_request_n."""
        if params.n != 1:
            raise ValueError("add_request takes n=1; use add_request_n for several samples")
        return (await self.add_request_n(request_id, prompt, params, *args))[0]

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def submit(self, fn: Callable[[], Any]) -> None:
        """Run `fn()` on the engine thread between steps, from any thread, without waiting for it;
        an error it raises is logged."""

        def command() -> None:
            try:
                fn()
            except Exception:
                logger.exception("engine command %s failed", getattr(fn, "__qualname__", fn))

        self._commands.put(command)

    def abort(self, request_id: str) -> None:
        """Abort a request (from any thread); its pages return to the pool at the next command drain."""
        self._streams.pop(request_id, None)
        self._commands.put(lambda: self.engine.abort_request(request_id))

    @property
    def num_streams(self) -> int:
        return len(self._streams)


class RequestStream:
    """One request's outputs as the engine makes them, ending with the finished one (or raising
    the error that ended it). `aclose()` before the end aborts the request and frees its pages at
    once, also for a stream never read (an async generator's cleanup would not run then)."""

    def __init__(self, aengine: AsyncEngine, request_id: str, q: asyncio.Queue[Any]) -> None:
        self._aengine, self.request_id, self._q = aengine, request_id, q
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._q.get()
        failed = isinstance(item, BaseException)
        if failed or item.finished:
            self._done = True
            self._aengine._forget(self.request_id)
        if failed:
            raise item
        return item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._aengine.abort(self.request_id)
