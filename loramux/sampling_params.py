"""SamplingParams: how to pick tokens and when to stop, with vLLM's field names.

Boundary: validated plain data (no torch). The executor reads the sampling
fields; the control plane reads only the limits (max_tokens, stop ids, eos).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens."""
    min_tokens: int = 0
    """Do not stop on eos or stop ids before this many tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings; the output ends before them unless include_stop_str_in_output."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (the id is kept in the output)."""
    ignore_eos: bool = False
    """Keep going past eos (benchmarks use it for fixed lengths)."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives (0..20)."""
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    """Samples per prompt; they share the prompt's KV through the prefix cache."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token already in the output."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted once per occurrence of a token in the output."""
    repetition_penalty: float = 1.0
    """HF/vLLM's: logits of tokens in the prompt or output are divided by it (multiplied if negative)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits; a dict is accepted and stored as pairs."""
    max_queue_time: float | None = None
    """Seconds the request may wait before it is first scheduled; past that it ends with
    finish_reason "timeout" and no tokens (the server answers 503, code queue_timeout)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))  # normalise the input once, at creation
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}; it must be an integer >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature}; it must lie in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; it must lie in (0, 1]")
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k}; use -1 or 0 for all tokens, or k >= 1")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens}; it must lie in [0, max_tokens={self.max_tokens}]"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs={self.logprobs}; it must lie in [0, 20]")
        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            raise ValueError(f"n={self.n!r}; it must be an integer in [1, 128]")
        if self.max_queue_time is not None and not self.max_queue_time > 0:
            raise ValueError(f"max_queue_time={self.max_queue_time}; it must be a number of seconds > 0")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)}; it must lie in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}; it must lie in (0, 2]")
        if any(t < 0 or not -100.0 <= b <= 100.0 for t, b in self.logit_bias):
            raise ValueError("logit_bias maps token ids (>= 0) to biases in [-100, 100]")

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the request's token history."""
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
