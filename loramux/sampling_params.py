"""SamplingParams: how to pick tokens and when to stop, with vLLM's field names.

Boundary: validated plain data (no torch). The executor reads the sampling
fields; the control plane reads only the limits (max_tokens, stop ids, eos).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_LOGPROBS = 20  # the most alternatives per token (OpenAI's top_logprobs cap)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit generator seed (torch's and vLLM's range)
GREEDY_BELOW = 1e-5  # temperatures below this sample greedily, as vLLM's _SAMPLING_EPS


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's structured outputs: the output must match exactly one of these (compiled with
    xgrammar). A dict schema is kept as JSON text, so equal schemas share one compiled grammar."""

    json: str | dict[str, Any] | None = None
    """A JSON Schema (dict or JSON text) the output must validate against."""
    regex: str | None = None
    """A regular expression the whole output must match."""
    choice: tuple[str, ...] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar in EBNF (GBNF, as llama.cpp's; the start rule is `root`)."""
    json_object: bool = False
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    disable_any_whitespace: bool = False
    """JSON without optional whitespace (vLLM's flag): small models can loop on whitespace."""

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json.dumps(self.json))  # key order kept: it orders the output
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(
                f"structured outputs take exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(given) or 'none'}"
            )
        if self.json is not None:
            try:
                schema = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON ({e}); send a JSON object") from None
            if not isinstance(schema, dict | bool):
                raise ValueError("a JSON schema is an object (or true/false); send a JSON object")
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("choice is a non-empty list of non-empty strings")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} is a non-empty string")

    @property
    def kind(self) -> str:
        """What constrains the output: "JSON schema", "JSON object", "regex", "choice" or "grammar"."""
        if self.json is not None:
            return "JSON schema"
        if self.json_object:
            return "JSON object"
        return "regex" if self.regex is not None else "choice" if self.choice is not None else "grammar"

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the compiled grammar (kind, text)."""
        text = self.json or self.regex or self.grammar or ""
        if self.choice is not None:
            text = json.dumps(self.choice)
        return (f"{self.kind}{'/compact' if self.disable_any_whitespace else ''}", text)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 means greedy (so does anything below 1e-5, where logits / temperature would overflow)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    min_p: float = 0.0
    """Keep only tokens at least min_p times as likely as the most likely one (0: off); applied
    after temperature, before top-k and top-p, as vLLM does."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens. A 64-bit signed integer; sample i
    of n uses seed + i, so seed + n - 1 must fit too."""
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
    truncate_prompt_tokens: int | None = None
    """Keep only the prompt's last k tokens (vLLM's left truncation); -1: the model's length limit."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob (given the tokens before it) and this many top
    alternatives (0..20), as vLLM's: the request then computes its whole prompt (no prefix-cache
    hit), and `RequestOutput.prompt_logprobs` holds them (None for the first token)."""
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    """Samples per prompt; they share the prompt's KV through the prefix cache."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token already in the output."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted once per occurrence of a token in the output."""
    repetition_penalty: float = 1.0
    """HF/vLLM's: logits of tokens in the prompt or output are divided by it (multiplied if negative).
    At least 1e-6: below that the division overflows float32."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits; a dict is accepted and stored as pairs."""
    allowed_token_ids: tuple[int, ...] | None = None
    """vLLM's: only these token ids may be sampled (the others' logits are -inf)."""
    bad_words: tuple[str, ...] = ()
    """vLLM's: words the output may not contain. Each is tokenized as it is and after a space;
    a token is forbidden where it would complete one of those token sequences."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a JSON schema, a regex, a choice or a grammar (vLLM's field)."""
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
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        words = (self.bad_words,) if isinstance(self.bad_words, str) else tuple(self.bad_words)
        object.__setattr__(self, "bad_words", words)
        self._validate()

    def _validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r}; it must be an integer >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature}; it must lie in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}; it must lie in (0, 1]")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or (k < 1 and k != -1)):
            raise ValueError(f"truncate_prompt_tokens={k!r}; give k >= 1 (keep the last k tokens) or -1")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p}; it must lie in [0, 1]")
        if self.top_k < -1:
            raise ValueError(f"top_k={self.top_k}; use -1 or 0 for all tokens, or k >= 1")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens}; it must lie in [0, max_tokens={self.max_tokens}]"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs}; it must lie in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"prompt_logprobs={self.prompt_logprobs}; it must lie in [0, {MAX_LOGPROBS}]")
        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            raise ValueError(f"n={self.n!r}; it must be an integer in [1, 128]")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1):
            top = "2**63 - 1" if self.n == 1 else f"2**63 - 1 - (n - 1) = {SEED_MAX - self.n + 1}"
            raise ValueError(
                f"seed={self.seed}; it must be a 64-bit integer in [-2**63, {top}] (sample i of n "
                f"uses seed + i); pick a smaller seed"
            )
        if any(t < 0 for t in self.stop_token_ids):
            bad = next(t for t in self.stop_token_ids if t < 0)
            raise ValueError(f"stop_token_ids holds {bad}; token ids are integers >= 0")
        if self.max_queue_time is not None and not self.max_queue_time > 0:
            raise ValueError(f"max_queue_time={self.max_queue_time}; it must be a number of seconds > 0")
        if self.structured_outputs is not None and self.ignore_eos:
            raise ValueError(
                "ignore_eos with structured outputs would run past the end of the grammar, where only "
                "eos may come; drop ignore_eos"
            )
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name}={getattr(self, name)}; it must lie in [-2, 2]")
        if not 1e-6 <= self.repetition_penalty <= 2.0:  # logits are divided by it, in float32
            raise ValueError(f"repetition_penalty={self.repetition_penalty}; it must lie in [1e-6, 2]")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids is empty: nothing could be sampled; give at least one id")
        if any(not isinstance(w, str) or not w.strip() for w in self.bad_words):
            raise ValueError("bad_words must be non-empty strings")
        for t, b in self.logit_bias:
            if t < 0 or not -100.0 <= b <= 100.0:
                raise ValueError(f"logit_bias maps token ids (>= 0) to biases in [-100, 100]; got {t}: {b}")

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the request's token history."""
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError naming the field and the id if a token id lies outside [0, vocab_size):
        the sampler indexes the logits with these, so one out of range would fail the step."""
        for field, ids in (
            ("logit_bias", [t for t, _ in self.logit_bias]),
            ("stop_token_ids", self.stop_token_ids),
            ("allowed_token_ids", self.allowed_token_ids or ()),
        ):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"{field} names token id {bad[0]}, outside this model's vocabulary [0, {vocab_size}); "
                    f"use ids below {vocab_size} (POST /tokenize shows a text's ids)"
                )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and k > vocab_size:
                raise ValueError(
                    f"{name}={k} asks for more alternatives than the vocabulary's "
                    f"{vocab_size} tokens; ask for at most {vocab_size}"
                )
