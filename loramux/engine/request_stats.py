"""What the engine measures of its requests and steps, in vLLM's definitions and buckets.

Boundary: plain Python, filled on the engine thread as tokens are taken and
requests end, read through `LLMEngine.snapshot()` (a copy). It records what
vLLM's Prometheus metrics record (vllm/v1/metrics/loggers.py): time to first
token as the first token is taken, each gap between tokens as it happens,
per-request phases when a request ends, tokens per step. Histograms are
bucket counts here, not Prometheus objects, so a token costs one bisect and no
lock; server/vllm_metrics.py renders them.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass, field


def _bounds(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split())


# vLLM's buckets (v0.11-0.12), so quantiles on a vLLM dashboard read the same here.
TTFT_BUCKETS = _bounds(
    "0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.25 0.5 0.75 1 2.5 5 7.5 10 20 40 80 160 640 2560"
)
TOKEN_GAP_BUCKETS = _bounds("0.01 0.025 0.05 0.075 0.1 0.15 0.2 0.3 0.4 0.5 0.75 1 2.5 5 7.5 10 20 40 80")
REQUEST_LATENCY_BUCKETS = _bounds("0.3 0.5 0.8 1 1.5 2 2.5 5 10 15 20 30 40 50 60 120 240 480 960 1920 7680")
STEP_TOKEN_BUCKETS = _bounds("1 8 16 32 64 128 256 512 1024 2048 4096 8192 16384")
N_BUCKETS = _bounds("1 2 5 10 20")
# vLLM's finish reasons as its request_success counter labels them; loramux's queue timeout is an abort.
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "timeout": "abort", "error": "error"}


def buckets_1_2_5(limit: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets for max_model_len)."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


@dataclass
class Histogram:
    """Counts per bucket (`bounds` are the upper bounds; the last count is +Inf), with the sum."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def add(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class RequestStats:
    """Cumulative, since the engine started."""

    max_model_len: int
    prompt_tokens: int = 0  # prompts of requests that produced their first token (vLLM's count)
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS.values(), 0))
    hist: dict[str, Histogram] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tokens = buckets_1_2_5(self.max_model_len)
        spec = {
            "ttft": TTFT_BUCKETS,
            "token_gap": TOKEN_GAP_BUCKETS,
            "request_tpot": TOKEN_GAP_BUCKETS,
            "step_tokens": STEP_TOKEN_BUCKETS,
            "n": N_BUCKETS,
            **dict.fromkeys(("prompt_len", "output_len", "max_tokens", "max_output_len"), tokens),
            **dict.fromkeys(("e2e", "queue", "inference", "prefill", "decode"), REQUEST_LATENCY_BUCKETS),
        }
        self.hist = {name: Histogram(bounds) for name, bounds in spec.items()}

    def copy(self) -> RequestStats:
        return copy.deepcopy(self)
