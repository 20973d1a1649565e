"""The plain-data hand-off between the scheduler and any executor, in both directions.

Boundary: ids, counts and lists only, so that the real executor, the fake one
in tests and a cost model can all consume a `SchedulerOutput` and answer with
a `RunnerOutput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from loramux.core.adapters import AdapterPlan
from loramux.core.prefix_cache import KVCopy


class ScheduledSeq(NamedTuple):
    """One request's share of a step: a snapshot, made only by the scheduler's `_hand_off`."""

    request_id: str
    token_ids: list[int]  # tokens to compute now
    start_pos: int  # position of token_ids[0]; tokens before it are in the KV pages
    page_ids: tuple[int, ...]  # the request's page table at this step
    adapter_uid: int | None
    lora_slot: int | None  # device slot of the adapter; None for the base model
    sample: bool  # True when this step computes the last known token: sample the next one
    sampling: Any  # the executor's sampling parameters, opaque to the control plane
    # Token ids the sample must not be (eos and stop ids until the request has min_tokens outputs).
    suppress: frozenset[int] = frozenset()
    # The request's token list (its own, not a copy: it only grows, so its first
    # start_pos + len(token_ids) entries, all an executor may read, are fixed) and how many of
    # its tokens are the prompt: what repetition, frequency and presence penalties count.
    context: Sequence[int] = ()
    num_prompt: int = 0
    lora_start: int = 0  # activated LoRA: positions before this one are computed without the adapter


class TokenMasks(NamedTuple):
    """The tokens each grammar-constrained row may sample this step, filled in by the engine:
    `bitmask` is packed (int32 [len(request_ids), ceil(V / 32)]; bit t of row i set: token t
    allowed for request_ids[i]). Opaque to the control plane, as `sampling` is."""

    request_ids: list[str]
    bitmask: Any


@dataclass(frozen=True)
class SchedulerOutput:
    step: int
    seqs: list[ScheduledSeq]
    num_batched_tokens: int
    adapter_plan: AdapterPlan
    finished_ids: list[str] = field(default_factory=list)  # finished since the last step
    preempted_ids: list[str] = field(default_factory=list)
    # host-tier page copies, in order, before the forward
    kv_copies: list[KVCopy] = field(default_factory=list)
    token_masks: TokenMasks | None = None  # structured output (the engine adds it after schedule())

    @property
    def adapter_uids(self) -> set[int]:
        return {s.adapter_uid for s in self.seqs if s.adapter_uid is not None}


class SampleLogprobs(NamedTuple):
    token_logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    rank: int | None = None  # the token's rank in its distribution (1: the most likely); prompt tokens


class RunnerOutput(NamedTuple):
    """What the executor returns: one sampled token per sampling seq (None elsewhere).

    `errors` names the requests whose own sampling failed (request id -> why): they sampled
    nothing and end alone; every other row of the step is good.
    """

    sampled_token_ids: list[int | None]
    logprobs: list[SampleLogprobs | None] | None = None
    errors: dict[str, str] | None = None
    # request id -> (p, logprobs of the prompt tokens at positions p + 1, p + 2, ...): what this
    # step's rows of a request that asked for prompt logprobs gave (each row predicts the next)
    prompt_logprobs: dict[str, tuple[int, list[SampleLogprobs]]] | None = None
