"""The simulator's metrics, exactly as shared/research/papers.md section 4 defines them.

Boundary: records in, numbers out; no engine.

    ttft          = first token - arrival (queueing, adapter load and prefill included)
    attainment    = mean over all issued requests of 1[ttft < slo]; aborted or unserved -> 0
    tpot          = (finish - first token) / (output tokens - 1), 0 for one token      (vLLM's TPOT)
    attainment with a TPOT target = mean of 1[ttft < slo and tpot <= tpot_slo]; unfinished -> 0
                    (DistServe's SLO attainment; vLLM's `--goodput ttft:.. tpot:..` over requests)
    satisfaction  = mean over all issued requests of (1 - ttft^2 / slo^2 if ttft < slo else 0)
    throughput    = completed / (last completion - first arrival)       (S-LoRA's; capped by load)
    capacity      = the highest rate whose attainment is >= 0.9
    per-token     = mean over completed of e2e latency / output tokens    (dLoRA, vLLM)
    decode per token = mean over completed of (finish - first token) / (output tokens - 1)   (Punica)
    adapter loads per second = swap-ins into a device slot / (last completion - first arrival)
    longest wait  = max over requests of (first scheduled, else abort or end) - arrival
    VTC service   = each request's in + 2 x out spread evenly over [first token, finish]
    service_diff  = per window: sum_j min(max_k s_k - s_j, |demand_j - s_j|), s and demand in
                    tokens/s over a 60 s window (VTC artifact; ticks i*T/n, window shifted by the
                    warm-up); max, mean and variance over the ticks
    acc_diff      = max_j S_j - min_j S_j, S_j = client j's service from the warm-up to the last
                    tick (the artifact's final accumulated difference: the drain is not in it)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from loramux.sim.run import Record

SLO_S = 6.0


def ttft(r: Record) -> float | None:
    return None if r.first_token is None else r.first_token - r.arrival


def _span(records: Sequence[Record]) -> float:
    done = [r.finish for r in records if r.finish is not None and not r.aborted]
    if not done:
        return 0.0
    return max(done) - min(r.arrival for r in records)


def throughput(records: Sequence[Record]) -> float:
    """Completed requests per second, S-LoRA's way (first arrival to last completion)."""
    span = _span(records)
    n = sum(1 for r in records if r.finish is not None and not r.aborted)
    return n / span if span > 0 else 0.0


def token_throughput(records: Sequence[Record]) -> float:
    """Generated tokens per second over the same span."""
    span = _span(records)
    return sum(r.output_tokens for r in records if not r.aborted) / span if span > 0 else 0.0


class Timed(Protocol):
    """What TPOT reads of a request: the simulator's `Record` or the online bench's."""

    first_token: float | None
    finish: float | None
    output_tokens: int
    aborted: bool


def tpot(r: Timed) -> float | None:
    """Time per output token after the first (vLLM's TPOT); None while unfinished or if aborted."""
    if r.first_token is None or r.finish is None or r.aborted:
        return None
    return (r.finish - r.first_token) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def attainment(records: Sequence[Record], slo: float = SLO_S, tpot_slo: float | None = None) -> float:
    """The share of issued requests whose TTFT is under `slo`; with `tpot_slo`, those that also
    finish with a TPOT at or under it (a stream that stalls after its first token misses)."""
    if not records:
        return 0.0
    hit = sum(
        1
        for r in records
        if (t := ttft(r)) is not None
        and t < slo
        and (tpot_slo is None or ((d := tpot(r)) is not None and d <= tpot_slo))
    )
    return hit / len(records)


def satisfaction(records: Sequence[Record], slo: float = SLO_S) -> float:
    if not records:
        return 0.0
    return sum(1 - t * t / (slo * slo) for r in records if (t := ttft(r)) is not None and t < slo) / len(
        records
    )


@dataclass(frozen=True)
class Stats:
    n: int
    mean: float
    p50: float
    p90: float
    p99: float


def stats(values: Iterable[float]) -> Stats:
    v = np.asarray(list(values), dtype=float)
    if not len(v):
        return Stats(0, math.nan, math.nan, math.nan, math.nan)
    p50, p90, p99 = np.percentile(v, [50, 90, 99])  # linear interpolation between ranks
    return Stats(len(v), float(v.mean()), float(p50), float(p90), float(p99))


def ttft_stats(records: Sequence[Record]) -> Stats:
    return stats(t for r in records if (t := ttft(r)) is not None)


def e2e_stats(records: Sequence[Record]) -> Stats:
    return stats(r.finish - r.arrival for r in records if r.finish is not None and not r.aborted)


def ttft_by_adapter(records: Sequence[Record]) -> dict[int | None, Stats]:
    groups: dict[int | None, list[float]] = defaultdict(list)
    for r in records:
        if (t := ttft(r)) is not None:
            groups[r.adapter].append(t)
    return {k: stats(v) for k, v in groups.items()}


def per_token_latency(records: Sequence[Record]) -> float:
    done = [
        (r.finish - r.arrival) / r.output_tokens
        for r in records
        if r.finish is not None and not r.aborted and r.output_tokens
    ]
    return float(np.mean(done)) if done else math.nan


def decode_per_token(records: Sequence[Record]) -> float:
    """Punica's decode latency per token: the decode phase only, queueing and prefill left out."""
    done = [d for r in records if r.output_tokens > 1 and (d := tpot(r)) is not None]
    return float(np.mean(done)) if done else math.nan


def loads_per_second(adapter_loads: int, records: Sequence[Record]) -> float:
    span = _span(records)
    return adapter_loads / span if span > 0 else 0.0


def longest_wait(records: Sequence[Record], end: float) -> float:
    """The longest any request waited to be first scheduled (unserved ones: until they were
    dropped, or until `end`)."""
    waits = [
        (r.first_scheduled if r.first_scheduled is not None else (r.finish if r.finish is not None else end))
        - r.arrival
        for r in records
    ]
    return max(waits, default=0.0)


def capacity(points: Iterable[tuple[float, float]], target: float = 0.9) -> float | None:
    """The highest rate whose attainment is >= target, from (rate, attainment) points."""
    ok = [rate for rate, att in points if att >= target]
    return max(ok) if ok else None


# --- VTC fairness ------------------------------------------------------------------------------------


def service(r: Record) -> float:
    return r.input_len + 2 * r.output_len


def _served(r: Record) -> tuple[float, float] | None:
    """[start, end] of the request's service, or None (aborted, never served, or instantaneous)."""
    if r.first_token is None or r.finish is None or r.aborted:
        return None
    start, end = r.first_token, r.finish
    if end < 1 or end - start < 1e-5:
        return None
    return start, end


def service_in(r: Record, lo: float, hi: float) -> float:
    """The part of r's service that falls in [lo, hi], spread evenly over its decode interval."""
    span = _served(r)
    if span is None:
        return 0.0
    start, end = span
    overlap = max(min(hi, end) - max(lo, start), 0.0)
    return service(r) * overlap / (end - start)


def tenants(records: Sequence[Record]) -> list[str]:
    return sorted({r.tenant for r in records})


def service_diff(
    records: Sequence[Record], horizon: float, ticks: int = 20, window: float = 60.0, warmup: float = 30.0
) -> list[float]:
    """VTC's windowed service difference at ticks i * horizon / ticks (i < ticks)."""
    users = tenants(records)
    by_user: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_user[r.tenant].append(r)
    out = []
    for i in range(ticks):
        x = horizon / ticks * i
        lo, hi = x - window / 2 + warmup, x + window / 2 + warmup
        s = {u: sum(service_in(r, lo, hi) for r in by_user[u]) / window for u in users}
        demand = {u: sum(service(r) for r in by_user[u] if lo <= r.arrival <= hi) / window for u in users}
        top = max(s.values())
        out.append(sum(min(top - s[u], abs(demand[u] - s[u])) for u in users))
    return out


@dataclass(frozen=True)
class Fairness:
    max_diff: float
    avg_diff: float
    var_diff: float
    acc_diff: float  # accumulated absolute difference at the last tick, in tokens
    tokens_per_s: float  # (in + out) of every request / the run's span (VTC's throughput)


def fairness(records: Sequence[Record], horizon: float, warmup: float = 30.0, ticks: int = 20) -> Fairness:
    diffs = service_diff(records, horizon, ticks, warmup=warmup)
    end = max((r.finish for r in records if r.finish is not None), default=0.0)
    acc = accumulated_service(records, warmup, horizon * (ticks - 1) / ticks + warmup)  # at the last tick
    span = end - min((r.arrival for r in records), default=0.0)
    total = sum(r.input_len + r.output_len for r in records if r.finish is not None and not r.aborted)
    return Fairness(
        float(max(diffs)),
        float(np.mean(diffs)),
        float(np.var(diffs)),
        max(acc.values()) - min(acc.values()) if acc else 0.0,
        total / span if span > 0 else 0.0,
    )


def accumulated_service(records: Sequence[Record], lo: float, hi: float) -> dict[str, float]:
    """Each tenant's service (tokens) over [lo, hi]."""
    acc: dict[str, float] = dict.fromkeys(tenants(records), 0.0)
    for r in records:
        acc[r.tenant] += service_in(r, lo, hi)
    return acc


def service_over_time(
    records: Sequence[Record], times: Sequence[float], window: float = 60.0
) -> dict[str, list[float]]:
    """Each tenant's service rate (tokens/s) in a window centred at each time."""
    by_user: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_user[r.tenant].append(r)
    return {
        u: [sum(service_in(r, x - window / 2, x + window / 2) for r in rs) / window for x in times]
        for u, rs in by_user.items()
    }
