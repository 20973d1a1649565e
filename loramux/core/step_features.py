"""The features a step's cost depends on, read off the scheduler's hand-off (issue 11).

Boundary: a `SchedulerOutput` and the adapters' ranks in, a `StepFeatures` tuple out; pure
Python. The simulator's cost model (sim/profile.py) is a sum of terms in these features, and the
engine's step log (engine/step_log.py) writes them beside each step's measured time, so a profile
can be fitted from serving itself.
"""

from __future__ import annotations

from typing import NamedTuple

from loramux.core.outputs import SchedulerOutput


class StepFeatures(NamedTuple):
    """What a step's cost depends on (the order of COST_TERMS)."""

    one: float
    prefill_tokens: int
    prefill_rows: int
    decode_rows: int
    context_tokens: int
    adapters: int
    adapter_ranks: int
    lora_rank_tokens: int


def step_features(out: SchedulerOutput, rank_of: dict[int, int]) -> StepFeatures:
    """The cost features of one step; `rank_of` maps adapter uid to rank."""
    prefill = prefill_rows = decode = context = rank_tokens = 0
    uids: set[int] = set()
    rank_of_get = rank_of.get
    for seq in out.seqs:
        n = len(seq.token_ids)
        if n == 1:
            decode += 1
        else:
            prefill += n
            prefill_rows += 1
        context += seq.start_pos + n
        uid = seq.adapter_uid
        if uid is not None:
            uids.add(uid)
            rank_tokens += n * rank_of_get(uid, 0)
    ranks = sum(rank_of_get(u, 0) for u in uids)
    return StepFeatures(1.0, prefill, prefill_rows, decode, context, len(uids), ranks, rank_tokens)
