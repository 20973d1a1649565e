"""A request as the control plane sees it: token ids, limits and counters.

Boundary: pure data. No tokenizer, no text, no torch. The scheduler mutates the
counters; everything else reads them. `repr` shows lengths, never tokens.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request. Every status after PREEMPTED is a finished one."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # eos or a stop token id
    FINISHED_LENGTH = 4  # max_tokens or the model's length limit
    FINISHED_ABORTED = 5  # aborted by the caller (or a disconnected client)
    FINISHED_TIMEOUT = 6  # waited longer than its queue deadline before it was first scheduled
    FINISHED_ERROR = 7  # a fault pinned on this request alone (its sampling, its text); the rest go on

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_TIMEOUT: "timeout",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """One generation request (S1.1).

    `adapter_uid` is the id of one *load* of an adapter (None means the base
    model): reloading an adapter under the same name gives a new uid, so its
    prefix-cache namespace is new too. `tenant` is the fairness account; it
    defaults to the adapter's name, or "base". `cache_salt` (vLLM's) gives its
    KV a namespace of its own within the adapter's: only requests with the same
    adapter and the same salt share cached pages.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    adapter_uid: int | None = None
    lora_name: str | None = None
    tenant: str = ""
    arrival_time: float = 0.0
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    min_tokens: int = 0
    queue_deadline: float = math.inf  # clock time by which it must have been scheduled once
    # Activated LoRA: the adapter applies from this position on; the tokens before it are the base
    # model's, so their KV is cached (and found) in the base model's namespace. 0: every token.
    lora_start: int = 0
    cache_salt: str | None = None
    # Compute every prompt token, never taking cached pages (the executor reports each prompt
    # token's logprob: vLLM's prompt_logprobs); its pages are still cached for others.
    full_prefill: bool = False
    # vLLM's bad_words as token sequences: the last token of one is forbidden where the output
    # ends with the ones before it (a one-token sequence always is).
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    # vLLM's priority: under the `priority` policy, smaller goes first (and is preempted last).
    priority: int = 0
    # Opaque to the control plane: the executor's sampling parameters.
    sampling: Any = None

    # --- counters, owned by the scheduler ---
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = field(default=0, init=False)
    num_cached_tokens: int | None = field(default=None, init=False)  # prefix hit at first admission
    num_preemptions: int = field(default=0, init=False)
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    # Its page table: a tuple the KV manager replaces (never edits), so a step's copy stays valid.
    page_ids: tuple[int, ...] = field(default=(), init=False)
    # How many of `page_ids` have been offered to the prefix cache.
    num_inserted_pages: int = field(default=0, init=False)
    arrival_seq: int | None = field(default=None, init=False)  # set when the scheduler queues it
    lora_slot: int | None = field(default=None, init=False)  # its adapter's device slot while running
    # Fixed at construction, for the per-token stop check: the ids that stop it, the length that ends it.
    stop_ids: frozenset[int] = field(init=False)
    end_len: int = field(init=False)
    first_scheduled_time: float | None = field(default=None, init=False)
    finished_time: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt is empty; send at least one token")
        if self.max_tokens < 1:
            raise ValueError(
                f"request {self.request_id!r}: max_tokens={self.max_tokens}; it must be at least 1"
            )
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            raise ValueError(
                f"request {self.request_id!r}: cache_salt={self.cache_salt!r}; give a non-empty string, "
                "or leave it out"
            )
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(
                f"request {self.request_id!r}: min_tokens={self.min_tokens} must lie in "
                f"[0, max_tokens={self.max_tokens}]"
            )
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.token_ids = list(self.prompt_token_ids)
        if not self.tenant:
            self.tenant = self.lora_name or "base"
        self.stop_ids = frozenset(self.stop_token_ids) | (
            frozenset() if self.ignore_eos else frozenset(self.eos_token_ids)
        )
        self.end_len = len(self.prompt_token_ids) + self.max_tokens

    # --- derived quantities ---
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def cache_uid(self) -> int | tuple[int | None, str] | None:
        """The prefix-cache namespace of its KV: the adapter's, or the base model's for the
        tokens before an activated LoRA's start (the only ones it caches); with a cache salt,
        (that namespace, the salt)."""
        ns = self.adapter_uid if self.lora_start == 0 else None
        return ns if self.cache_salt is None else (ns, self.cache_salt)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this request can ever hold: prompt plus max_tokens."""
        return len(self.prompt_token_ids) + self.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def check_invariants(self) -> None:
        assert 0 <= self.num_computed_tokens <= self.num_tokens, (
            f"{self!r}: computed {self.num_computed_tokens} outside [0, {self.num_tokens}]"
        )
        assert self.num_output_tokens <= self.max_tokens, (
            f"{self!r}: {self.num_output_tokens} outputs > max_tokens {self.max_tokens}"
        )

    def __repr__(self) -> str:  # lengths only: prompts never reach logs
        return (
            f"Request(id={self.request_id!r}, adapter={self.lora_name!r}, "
            f"prompt_len={self.num_prompt_tokens}, out={self.num_output_tokens}/{self.max_tokens}, "
            f"computed={self.num_computed_tokens}, status={self.status.name})"
        )
