"""AsyncEngine: the engine's step loop on its own thread, with an asyncio face.

Boundary: the engine is single-threaded and never touched from the event loop.
Everything that reads or changes it (adding a request, aborting one, loading
an adapter, taking a metrics snapshot) is a command run on the engine thread
between steps; results come back through futures the event loop awaits, and
outputs through one asyncio queue per request. The event loop never blocks on
a step, and a step never waits for a slow client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
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
        self._stop.set()
        self._commands.put(lambda: None)  # wake the thread
        self._thread.join(timeout=10)
        if self.engine.kv_publisher is not None:
            self.engine.kv_publisher.close()

    # --- the engine thread ---
    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            idle = not engine.has_unfinished_requests()
            try:
                cmd = self._commands.get(timeout=0.5) if idle else self._commands.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                cmd()
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
            if engine.has_unfinished_requests():
                self._step()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except EngineDeadError as err:  # the engine ended every request; tell their streams why
            logger.error(
                "engine stopped; ending %d streams: %s", len(self._streams), err, exc_info=err.__cause__
            )
            for rid in list(self._streams):
                self._deliver(rid, err)
            return
        if self.on_step is not None:
            self.on_step(outputs)
        for out in outputs:
            self._deliver(out.request_id, out)

    def _deliver(self, rid: str, item: Any) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    # --- the asyncio side ---
    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the engine thread between steps and await its result."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def command() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting coroutine
                fut.set_exception(e)

        self._commands.put(command)
        return await asyncio.wrap_future(fut)

    async def add_request_n(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        lora_name: str | None = None,
        tenant: str = "",
        fill_max_tokens: bool = False,
    ) -> list[AsyncIterator[RequestOutput]]:
        """Queue `params.n` samples of one prompt (LLMEngine.add_request_n); bad input raises here
        (ValueError, AdapterNotFoundError, QueueFullError, EngineDeadError).

        Returns one output stream per sample. Closing a stream before it finishes (the client went
        away, the handler was cancelled) aborts that request and frees its pages at once.
        """
        ids = sample_ids(request_id, params.n)
        loop = asyncio.get_running_loop()
        queues: list[asyncio.Queue[Any]] = []
        for rid in ids:
            q: asyncio.Queue[Any] = asyncio.Queue()
            self._streams[rid] = (loop, q)
            queues.append(q)
        try:
            await self.call(
                self.engine.add_request_n, request_id, prompt, params, lora_name, tenant, fill_max_tokens
            )
        except BaseException:
            for rid in ids:
                self._streams.pop(rid, None)
            raise
        return [self._outputs(rid, q) for rid, q in zip(ids, queues, strict=True)]

    async def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, *args: Any
    ) -> AsyncIterator[RequestOutput]:
        """One request (n=1) and its stream; see add_request_n."""
        if params.n != 1:
            raise ValueError("add_request takes n=1; use add_request_n for several samples")
        return (await self.add_request_n(request_id, prompt, params, *args))[0]

    async def _outputs(self, request_id: str, q: asyncio.Queue[Any]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if finished:
                self._streams.pop(request_id, None)
            else:
                self.abort(request_id)

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
