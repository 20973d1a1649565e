"""Prometheus metrics for the server (prometheus-client, one registry per server).

Boundary: per-request observations (outcome, latencies, token counts) are
recorded as requests end; everything the engine knows (queues per adapter,
residency, KV pages, cumulative counters) comes from a snapshot taken on the
engine thread when /metrics is scraped, so nothing reads the engine while it
steps. Per-adapter queues are separate labelled series, not comma-joined labels.
The same snapshot also feeds vLLM's metric names (vllm_metrics.py).
"""

from __future__ import annotations

import dataclasses

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from loramux.engine.outputs import RequestOutput
from loramux.engine.stats import EngineLimits, EngineSnapshot
from loramux.server.vllm_metrics import VllmMetrics

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_LOAD = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self, limits: EngineLimits, base_name: str, aliases: tuple[str, ...] = ()) -> None:
        self.base_name = base_name  # the base model's label (the engine calls it "")
        self.aliases = frozenset(aliases)  # the base model's other ids: counted under base_name
        disable_created_metrics()  # no *_created series: they double the output and nobody graphs them
        r = self.registry = CollectorRegistry()

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter("loramux_" + name, doc, labels, registry=r)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge("loramux_" + name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...], *labels: str) -> Histogram:
            return Histogram("loramux_" + name, doc, labels, buckets=buckets, registry=r)

        self.requests = counter("requests", "Requests by adapter and outcome", "adapter", "outcome")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests", "adapter")
        self.generation_tokens = counter("generation_tokens", "Generated tokens", "adapter")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token", _LATENCY, "adapter")
        self.tpot = histogram(
            "time_per_output_token_seconds", "Mean time per token after the first", _LATENCY, "adapter"
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token", _LATENCY, "adapter")
        self.running = gauge("requests_running", "Running requests", "adapter")
        self.waiting = gauge("requests_waiting", "Waiting requests", "adapter")
        self.resident = gauge("adapter_resident", "1 if the adapter sits in this tier", "adapter", "tier")
        self.resident_count = gauge("adapters_resident", "Adapters resident per tier", "tier")
        self.loads = counter("adapter_loads", "Adapter loads per tier", "tier")
        self.evictions = counter("adapter_evictions", "Adapter evictions per tier", "tier")
        self.load_seconds = histogram(
            "adapter_load_seconds", "Seconds per adapter load (disk or slot)", _LOAD
        )
        self.switches = counter("adapter_switches", "Adapter switches (device loads) made")
        self.naive_switches = counter(
            "adapter_switches_naive", "Switches an arrival-order schedule would have made"
        )
        self.preemptions = counter("preemptions", "Requests preempted for KV memory")
        self.prefix_query = counter("prefix_cache_query_tokens", "Prompt tokens looked up")
        self.prefix_hit = counter("prefix_cache_hit_tokens", "Prompt tokens found cached")
        self.prefix_rate = gauge("prefix_cache_hit_rate", "Hit tokens / looked-up tokens")
        self.pages_total = gauge("kv_pages_total", "KV pages in the pool")
        self.pages_free = gauge("kv_pages_free", "KV pages free")
        self.pages_cached = gauge("kv_pages_cached", "KV pages held only by the prefix cache")
        self.pages_used = gauge("kv_pages_in_use", "KV pages held by requests")
        self.references = gauge(
            "adapter_requests_active",
            "Unfinished requests holding each adapter (0 for all once idle)",
            "adapter",
        )
        self.steps = counter("engine_steps", "Engine steps")
        self.kv_offloaded = counter("kv_offloaded_pages", "Prefix pages moved to host memory")
        self.kv_onloaded = counter("kv_onloaded_pages", "Prefix pages brought back from host memory")
        self.kv_events = counter(
            "kv_events",
            "KV-cache events published, dropped (queue full), or batches lost to the transport (send_error)",
            "outcome",
        )
        self.engine_finished = counter(
            "engine_requests_finished",
            "Requests the scheduler ended, by reason (stop, length, abort)",
            "reason",
        )
        self.max_adapters = gauge("max_adapters_per_step", "Most distinct adapters seen in one step")
        self.config = gauge("config", "Engine limits in effect", "name")
        for f in dataclasses.fields(limits):
            self.config.labels(f.name).set(float(getattr(limits, f.name) or 0))
        self._seen: dict[str, float] = {}  # engine counters already added to the Counters
        self.vllm = VllmMetrics(r, base_name, limits.max_loras)  # vLLM's names, beside these

    def _advance(self, key: str, counter: Counter, value: float) -> None:
        delta = value - self._seen.get(key, 0.0)
        if delta > 0:
            counter.inc(delta)
        self._seen[key] = value

    # --- per request, as it ends ---
    def finished(self, adapter: str, out: RequestOutput) -> None:
        adapter = self.base_name if adapter in self.aliases else adapter
        comp = out.outputs[0]
        self.requests.labels(adapter, comp.finish_reason or "unknown").inc()
        self.prompt_tokens.labels(adapter).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(adapter).inc(len(comp.token_ids))
        m = out.metrics
        if m is None or m.first_token_time is None or m.finished_time is None:
            return
        self.ttft.labels(adapter).observe(m.first_token_time - m.arrival_time)
        self.e2e.labels(adapter).observe(m.finished_time - m.arrival_time)
        if len(comp.token_ids) > 1:
            self.tpot.labels(adapter).observe(
                (m.finished_time - m.first_token_time) / (len(comp.token_ids) - 1)
            )

    def ended(self, adapter: str, outcome: str) -> None:
        """A request that ended without a final output: aborted, rejected or failed."""
        self.requests.labels(self.base_name if adapter in self.aliases else adapter, outcome).inc()

    # --- from the engine ---
    def render(self, snap: EngineSnapshot) -> bytes:
        for gauge, values in ((self.running, snap.running), (self.waiting, snap.waiting)):
            gauge.clear()
            for k, v in values.items():
                gauge.labels(k or self.base_name).set(v)
        self.resident.clear()
        for tier, names in (("device", snap.device), ("host", snap.host)):
            self.resident_count.labels(tier).set(len(names))
            for n in names:
                self.resident.labels(n, tier).set(1)
        c = snap.counters
        for key, counter in (
            ("device_loads", self.loads.labels("device")),
            ("host_loads", self.loads.labels("host")),
            ("device_evictions", self.evictions.labels("device")),
            ("host_evictions", self.evictions.labels("host")),
            ("switches", self.switches),
            ("naive_switches", self.naive_switches),
            ("preemptions", self.preemptions),
            ("prefix_query_tokens", self.prefix_query),
            ("prefix_hit_tokens", self.prefix_hit),
            ("steps", self.steps),
            ("kv_offloaded", self.kv_offloaded),
            ("kv_onloaded", self.kv_onloaded),
            ("kv_events_published", self.kv_events.labels("published")),
            ("kv_events_dropped", self.kv_events.labels("dropped")),
            ("kv_events_send_errors", self.kv_events.labels("send_error")),
        ):
            self._advance(key, counter, c[key])
        for reason, n in snap.finished.items():
            self._advance("finished:" + reason, self.engine_finished.labels(reason), n)
        for sec in snap.load_seconds:
            self.load_seconds.observe(sec)
        q, h = c["prefix_query_tokens"], c["prefix_hit_tokens"]
        self.prefix_rate.set(h / q if q else 0.0)
        self.pages_total.set(snap.pages_total)
        self.pages_free.set(snap.pages_free)
        self.pages_cached.set(snap.pages_cached)
        self.pages_used.set(snap.pages_total - snap.pages_free - snap.pages_cached)
        self.references.clear()
        for name, n in snap.references.items():
            self.references.labels(name).set(n)
        self.max_adapters.set(c["max_adapters_per_step"])
        self.vllm.update(snap)
        return generate_latest(self.registry)
