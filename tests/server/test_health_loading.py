"""/health says "loading" while the adapters named at start are still being read, then "ok"
(issue 15, point 2). The real engine and app in-process; the executor's one reader thread is kept
busy first, so the reads started at start are certainly still queued when /health is asked."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from loramux.config import CacheConfig, EngineConfig, LoRAConfig, ModelConfig
from loramux.engine.llm_engine import LLMEngine
from loramux.server.api import ServerConfig, build_app
from loramux.server.async_engine import AsyncEngine
from loramux.server.metrics import Metrics


def test_health_says_loading_until_the_adapters_read_at_start_are_in_memory(tiny_models):
    tm = tiny_models["llama"]
    engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(str(tm.path), device="cpu", max_model_len=64),
            cache=CacheConfig(num_pages=32),
            lora=LoRAConfig(max_loras=2),
        )
    )
    names = sorted(tm.adapters)[:2]
    for name in names:
        engine.add_lora(name, str(tm.adapters[name]))
    aengine = AsyncEngine(engine)
    app = build_app(aengine, ServerConfig(served_model_name="base"), Metrics(engine.limits(), "base"))
    aengine.start()
    gate = threading.Event()
    engine.executor._reader.submit(gate.wait, 30)  # the reader thread is busy until the gate opens

    async def scenario() -> None:
        started = await aengine.call(engine.read_loras_ahead, names)
        assert started == 2
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.get("/health")
            assert r.status_code == 200 and r.json() == {"status": "loading", "adapters_loading": 2}
            gate.set()
            deadline = time.monotonic() + 30
            while (await client.get("/health")).json()["status"] == "loading":
                assert time.monotonic() < deadline, "adapter reads did not finish"
                await asyncio.sleep(0.01)
            assert (await client.get("/health")).json() == {"status": "ok"}

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
        aengine.shutdown()
