"""What the engine returns: vLLM-shaped `RequestOutput` and `CompletionOutput`.

Boundary: plain data. `text` and `token_ids` are cumulative; the `delta_*`
fields hold what this step added, for streaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loramux.core.outputs import SampleLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "timeout", "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it
    logprobs: list[SampleLogprobs] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_name: str | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    error: Exception | None = None
    """Why it ended with finish_reason "error": a fault of this request alone (RequestFailedError),
    or what stopped a later sample of n from starting (its adapter was unloaded, ...)."""
    prompt_logprobs: list[SampleLogprobs | None] | None = None
    """With SamplingParams.prompt_logprobs: each prompt token's logprob given the ones before it
    (and `rank`, and the top alternatives); None for the first token, as vLLM's."""
