"""vLLM's metric names on /metrics, for the dashboards, autoscalers and routers built for vLLM.

Boundary: a prometheus-client collector over the engine's last snapshot (the
server takes one per scrape); it reads nothing else. Names, types, label sets
and buckets are vLLM's (vllm/v1/metrics/loggers.py, v0.11-0.12), labelled
`model_name` (the served base model) and `engine` ("0": one engine per
server). It includes what the Kubernetes Gateway API Inference Extension's
model-server protocol reads for LoRA-affinity routing:
`vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc` and `vllm:lora_requests_info`. vLLM metrics with no
loramux meaning are left out (docs/vllm-compat.md says which, and why).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from loramux.engine.request_stats import Histogram
from loramux.engine.stats import EngineSnapshot

LABELS = ["model_name", "engine"]
# (vLLM's name, its help text, loramux's histogram in RequestStats.hist)
HISTOGRAMS = (
    ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", "ttft"),
    ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", "token_gap"),
    (
        "vllm:time_per_output_token_seconds",
        "Histogram of time per output token in seconds. (vLLM before 0.11; the same figures as "
        "vllm:inter_token_latency_seconds)",
        "token_gap",
    ),
    (
        "vllm:request_time_per_output_token_seconds",
        "Histogram of time_per_output_token_seconds per request.",
        "request_tpot",
    ),
    ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", "e2e"),
    ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", "queue"),
    (
        "vllm:request_inference_time_seconds",
        "Histogram of time spent in RUNNING phase for request.",
        "inference",
    ),
    ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", "prefill"),
    ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", "decode"),
    ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", "prompt_len"),
    ("vllm:request_generation_tokens", "Number of generation tokens processed.", "output_len"),
    ("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", "max_tokens"),
    (
        "vllm:request_max_num_generation_tokens",
        "Histogram of maximum number of requested generation tokens.",
        "max_output_len",
    ),
    ("vllm:request_params_n", "Histogram of the n request parameter.", "n"),
    ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", "step_tokens"),
)


class VllmMetrics:
    """Registers itself on `registry`; `update(snapshot)` before each scrape."""

    def __init__(self, registry: CollectorRegistry, model_name: str, max_loras: int) -> None:
        self.values = [model_name, "0"]
        self.max_lora = str(max_loras)
        self.snap: EngineSnapshot | None = None
        registry.register(self)

    def update(self, snap: EngineSnapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        if snap is None or snap.requests is None:
            return
        yield from self._scheduler(snap)
        stats, c = snap.requests, snap.counters
        for name, doc, value in (
            ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
             c["prefix_query_tokens"]),
            ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
             c["prefix_hit_tokens"]),
            ("vllm:num_preemptions", "Cumulative number of preemption from the engine.", c["preemptions"]),
            ("vllm:prompt_tokens", "Number of prefill tokens processed.", stats.prompt_tokens),
            ("vllm:generation_tokens", "Number of generation tokens processed.", stats.generation_tokens),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, doc, labels=LABELS)
            counter.add_metric(self.values, value)
            yield counter
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*LABELS, "finished_reason"],
        )
        for reason, n in stats.finished.items():
            success.add_metric([*self.values, reason], n)
        yield success
        for name, doc, key in HISTOGRAMS:
            yield self._histogram(name, doc, stats.hist[key])

    def _scheduler(self, snap: EngineSnapshot) -> Iterator[Metric]:
        used = snap.pages_total - snap.pages_free - snap.pages_cached  # cached idle pages are free to vLLM
        usage = used / snap.pages_total if snap.pages_total else 0.0
        running, waiting = sum(snap.running.values()), sum(snap.waiting.values())
        for name, doc, value in (
            ("vllm:num_requests_running", "Number of requests in model execution batches.", running),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", usage),
            ("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage. (vLLM before 0.10; "
             "the same figure as vllm:kv_cache_usage_perc)", usage),
        ):  # fmt: skip
            gauge = GaugeMetricFamily(name, doc, labels=LABELS)
            gauge.add_metric(self.values, value)
            yield gauge
        # The gateway's LoRA protocol: the value is when this was true (the snapshot's time);
        # running = in a device slot, ready; waiting = has requests queued. Names comma-separated.
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        queued = ",".join(sorted(name for name, n in snap.waiting.items() if name and n))
        lora.add_metric([self.max_lora, queued, ",".join(sorted(snap.device))], snap.time)
        yield lora

    def _histogram(self, name: str, doc: str, h: Histogram) -> Metric:
        family = HistogramMetricFamily(name, doc, labels=LABELS)
        cumulative, buckets = 0, []
        for bound, n in zip((*h.bounds, float("inf")), h.counts, strict=True):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        family.add_metric(self.values, buckets, sum_value=h.sum)
        return family
