"""What the engine tells front ends about itself: a snapshot of its state, and its limits.

Boundary: plain frozen data. `LLMEngine.snapshot()` builds an `EngineSnapshot`
on the engine's thread, between steps (the server asks through `AsyncEngine`);
`LLMEngine.limits()` reads only frozen configuration and measured runtime
values, so any thread may call it. Front ends (metrics, the CLI, Ray, the
simulator, the bench) read these, never the scheduler or the KV manager.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loramux.engine.request_stats import RequestStats


@dataclass(frozen=True)
class EngineSnapshot:
    """Queues, residency, KV pages and cumulative counters at one moment. Adapter names are the
    registered names; the base model is ""."""

    running: dict[str, int]  # running requests per adapter
    waiting: dict[str, int]  # waiting requests per adapter
    device: list[str]  # adapters in device slots
    host: list[str]  # adapters in host memory
    pages_total: int
    pages_free: int
    pages_cached: int  # idle pages the prefix cache holds (evictable)
    counters: dict[str, float] = field(default_factory=dict)
    finished: dict[str, int] = field(default_factory=dict)  # requests the scheduler ended, by reason
    load_seconds: list[float] = field(default_factory=list)  # adapter disk reads since the last snapshot
    references: dict[str, int] = field(default_factory=dict)  # unfinished requests per adapter
    requests: RequestStats | None = None  # vLLM's per-request and per-step figures (a copy)
    time: float = 0.0  # wall-clock time it was taken


@dataclass(frozen=True)
class EngineLimits:
    """The limits as the engine holds them (after defaults and measurements), not as parsed."""

    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_num_seqs: int
    max_num_batched_tokens: int
    prefill_budget: int
    max_queue_len: int | None
    num_pages: int
    page_size: int
    max_model_len: int
    prefix_caching: bool
    starvation_timeout_s: float
