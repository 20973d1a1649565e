"""AsyncEngine keeps the event loop free (issue: server, point 4).

The steps here are made slow (a FakeExecutor whose execute sleeps), so a step
run on the event loop would stop every other coroutine for its whole length.
A ticker coroutine must keep ticking while a request generates, the steps must
run on the engine's own thread, and closing a stream early must abort the
request and free its pages.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from loramux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.executor.fake import FakeExecutor
from loramux.sampling_params import SamplingParams
from loramux.server.async_engine import AsyncEngine

STEP_S = 0.1


class SlowFakeExecutor(FakeExecutor):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_threads: set[int] = set()

    def execute(self, out):
        self.step_threads.add(threading.get_ident())
        time.sleep(STEP_S)  # a long forward pass
        return super().execute(out)


def slow_engine() -> tuple[AsyncEngine, SlowFakeExecutor]:
    cfg = EngineConfig(
        model=ModelConfig("fake-model"),
        scheduler=SchedulerConfig(),
        cache=CacheConfig(page_size=4, num_pages=64),
        lora=LoRAConfig(max_loras=2),
    )
    ex = SlowFakeExecutor(64, 4, vocab_size=50)
    return AsyncEngine(LLMEngine(cfg, executor=ex, tokenizer=None)), ex


def test_slow_steps_never_block_the_event_loop():
    engine, ex = slow_engine()
    engine.start()

    async def go() -> tuple[int, int, list[int]]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        stream = await engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True))
        tokens = [t async for out in stream for t in out.outputs[0].delta_token_ids]
        elapsed = time.perf_counter() - t0
        done.set()
        await tick_task
        return ticks, round(elapsed / 0.01), tokens

    try:
        ticks, possible, tokens = asyncio.run(go())
    finally:
        engine.shutdown()
    assert len(tokens) == 10
    assert threading.main_thread().ident not in ex.step_threads  # steps ran off the loop's thread
    # 10 steps of 0.1 s: about 100 ticks were possible. A loop blocked by each step would get at
    # most one tick per step; a free one gets most of them.
    assert possible >= 100 and ticks > possible // 2, (ticks, possible)


def test_closing_a_stream_early_aborts_and_frees_pages():
    engine, _ = slow_engine()
    engine.start()

    async def go() -> None:
        stream = await engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
        async for _ in stream:
            break  # the client went away after the first token
        await stream.aclose()

    try:
        asyncio.run(go())
        deadline = time.time() + 10
        while time.time() < deadline and engine.engine.has_unfinished_requests():
            time.sleep(0.05)
        assert not engine.engine.has_unfinished_requests()
        kv = engine.engine.scheduler.kv
        assert kv.pool.num_free + kv.cache.num_evictable == kv.pool.num_pages  # none held by a request
    finally:
        engine.shutdown()


def test_a_request_id_in_use_is_refused_and_the_running_request_keeps_its_stream():
    """Two requests with one id used to share one output stream: the second replaced the first's
    and the first's client waited forever. Now the second is a ValueError naming the id, before
    anything of it is queued, and the first finishes (S6.1: bad input never hangs another)."""
    engine, _ = slow_engine()
    engine.start()

    async def go() -> tuple[int, str]:
        first = await engine.add_request("same", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True))
        try:
            await engine.add_request("same", [4, 5], SamplingParams(max_tokens=2))
            error = ""
        except ValueError as e:
            error = str(e)
        outs = [o async for o in first]
        return len(outs[-1].outputs[0].token_ids), error

    try:
        tokens, error = asyncio.run(asyncio.wait_for(go(), 30))
    finally:
        engine.shutdown()
    assert tokens == 3 and "request id 'same' is in use by an unfinished request" in error
    direct = slow_engine()[0].engine
    direct.add_request("r", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request id 'r' is in use"):
        direct.add_request("r", [3], SamplingParams(max_tokens=1))
    direct.add_request("s-1", [1], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="request id 's-1' is in use"):
        direct.add_request_n("s", [1], SamplingParams(max_tokens=1, n=2))
    assert "s-0" not in direct._states  # nothing of the refused request was queued
