"""The multi-LoRA scheduler trace of issue 10, replayed through the real control plane.

Boundary: decisions only. It builds the real `Scheduler` (with its policy,
KV pool, prefix cache and adapter manager) from the engine's own config
classes and defaults, adds the whole trace before step 1, and answers each
step with one token for every request whose prefill is complete; no model,
no torch. It measures what the scheduler decided: tokens and requests per
step, distinct adapters per step, completions, the longest wait, admissions
out of arrival order, and for `fair` how long the least-served tenant went
unserved.

The trace (numpy's legacy generator, seeded once, draws in this order):
adapter = floor(power(a) * n_adapters) for every request, then prompt lengths
U[8, 512), then max_tokens U[8, 512), then the prompts' token ids U[3, 500);
no early stop. Engine: max_num_seqs 256, max_num_batched_tokens 8192,
max_model_len 2048, pages of 16 tokens, 17600 pages, prefix caching on. The
scheduler's clock is virtual, `step_s` a step, so aging acts as in service.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np

from loramux.config import CacheConfig, LoRAConfig, SchedulerConfig
from loramux.core import AdapterManager, KVCacheManager, Request, RunnerOutput, Scheduler

# vLLM v1 (0.33) on this trace, tokens per step (issue 10): (max_loras, adapters) -> {a: figure}.
VLLM_TOKENS_PER_STEP: dict[tuple[int | None, int], dict[float, float]] = {
    (32, 1000): {1.0: 163.0, 0.3: 503.0},
    (4, 1000): {1.0: 18.0, 0.3: 57.2},
    (32, 32): {1.0: 499.0, 0.3: 500.0},
    (None, 0): {1.0: 499.0, 0.3: 499.0},
}


@dataclass(frozen=True)
class TraceSetup:
    """One configuration of the trace: adapter cap and count (None, 0: no LoRA), skew, policy."""

    max_loras: int | None
    n_adapters: int
    power: float = 1.0
    policy: str = "fcfs"
    aging: bool = True
    max_cpu_loras: int | None = None  # None: the engine's default
    n_requests: int = 4096
    warmup_steps: int = 512
    steps: int = 300
    seed: int = 0
    step_s: float = 0.05
    check_every: int = 0  # check_integrity() every this many steps, and at the end (0: never)
    high_share: float = 0.0  # this share of the requests (own draw: the trace is unchanged) at priority -1

    @property
    def label(self) -> str:
        return "no LoRA" if self.max_loras is None else f"{self.max_loras}:{self.n_adapters}"


@dataclass
class TraceResult:
    setup: TraceSetup
    sched_ms_p50: float = 0.0  # schedule() + update_from_output(), median over measured steps
    tokens_per_step: float = 0.0
    seqs_per_step: float = 0.0
    adapters_per_step: float = 0.0
    completed: int = 0  # over the whole run, warm-up included
    admissions: int = 0
    out_of_order: int = 0  # admissions while an earlier arrival still waited after the step
    longest_wait_steps: int = 0  # longest wait of any request admitted, in steps
    oldest_waiting_steps: int = 0  # how long the oldest request still waiting at the end has waited
    min_counter_stall_steps: int = 0  # fair: longest stretch the least-served tenant was passed over
    reservations: int = 0
    preemptions: int = 0
    not_work_conserving: int = 0  # steps that left seats, tokens and pages free while admissible work waited
    # with high_share, per class: (share started by the end, median wait to the first step of those
    # started, in steps)
    high_started: tuple[float, float] = (0.0, 0.0)
    low_started: tuple[float, float] = (0.0, 0.0)


def make_trace(n_requests: int, n_adapters: int, power: float, seed: int) -> list[tuple[int, list[int], int]]:
    """(adapter index, prompt ids, max_tokens) per request, draw for draw as described above."""
    np.random.seed(seed)
    adapters = np.floor(np.random.power(power, n_requests) * max(n_adapters, 1)).astype(int)
    prompt_lens = np.random.randint(8, 512, n_requests)
    max_tokens = np.random.randint(8, 512, n_requests)
    ids = np.random.randint(3, 500, int(prompt_lens.sum()))
    out, at = [], 0
    for k, n, m in zip(adapters.tolist(), prompt_lens.tolist(), max_tokens.tolist(), strict=True):
        out.append((k, ids[at : at + n].tolist(), m))
        at += n
    return out


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def build_scheduler(setup: TraceSetup, clock: _Clock) -> Scheduler:
    sched = SchedulerConfig(
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        policy=setup.policy,
        **({} if setup.aging else {"starvation_timeout_s": math.inf}),
    )
    cache = CacheConfig(page_size=16, num_pages=17600, enable_prefix_caching=True)
    lora = LoRAConfig(
        max_loras=setup.max_loras or 1,
        **({"max_cpu_loras": setup.max_cpu_loras} if setup.max_cpu_loras else {}),
    )
    kv = KVCacheManager.create(cache.num_pages, cache.page_size, cache.enable_prefix_caching)
    adapters = AdapterManager(lora.max_loras, lora.cpu_slots, lora.max_lora_rank, lora.max_lora_bytes)
    s = Scheduler(sched, kv, adapters, max_model_len=2048, clock=clock)
    if setup.max_loras is not None:
        for i in range(setup.n_adapters):
            s.register_adapter(f"a{i}", version="v1", rank=8, nbytes=1 << 20)
    return s


def run_trace(setup: TraceSetup) -> TraceResult:
    clock = _Clock()
    s = build_scheduler(setup, clock)
    lora = setup.max_loras is not None
    reqs: dict[str, Request] = {}
    trace = make_trace(setup.n_requests, setup.n_adapters, setup.power, setup.seed)
    high = np.random.default_rng(setup.seed + 1).random(len(trace)) < setup.high_share
    for i, (k, prompt, max_tokens) in enumerate(trace):
        req = Request(
            f"r{i}",
            prompt,
            max_tokens,
            lora_name=f"a{k}" if lora else None,
            ignore_eos=True,
            priority=-1 if high[i] else 0,
        )
        reqs[req.request_id] = req
        s.add_request(req)
    res = TraceResult(setup)
    fair = setup.policy == "fair"
    times: list[float] = []
    tokens: list[int] = []
    seqs: list[int] = []
    n_adapters: list[int] = []
    stall: dict[str, int] = {}  # fair: steps each least-served tenant has gone unserved
    # (getattr: the trace also replays older schedulers, which had neither; see --baseline)
    check = getattr(s, "check_work_conserving", lambda out: None)
    for i in range(setup.warmup_steps + setup.steps):
        running_before = {r.request_id for r in s.running}
        t0 = time.perf_counter()
        out = s.schedule()
        t1 = time.perf_counter()
        try:
            check(out)
        except AssertionError:
            res.not_work_conserving += 1
        t2 = time.perf_counter()
        upd = s.update_from_output(out, RunnerOutput([1 if q.sample else None for q in out.seqs]))
        dt = time.perf_counter() - t2 + t1 - t0
        if setup.check_every and i % setup.check_every == 0:
            s.check_integrity()
        admitted = [q.request_id for q in out.seqs if q.request_id not in running_before]
        res.admissions += len(admitted)
        oldest = min((r.arrival_seq for r in s.policy), default=math.inf)
        res.out_of_order += sum(1 for rid in admitted if reqs[rid].arrival_seq > oldest)
        if fair:
            _track_fair_stall(s, stall, {reqs[rid].tenant for rid in admitted}, res)
        res.completed += len(upd.finished)
        if i >= setup.warmup_steps:
            times.append(dt)
            tokens.append(out.num_batched_tokens)
            seqs.append(len(out.seqs))
            n_adapters.append(len(out.adapter_uids))
        clock.t += setup.step_s
    res.sched_ms_p50 = 1e3 * statistics.median(times)
    res.tokens_per_step = statistics.mean(tokens)
    res.seqs_per_step = statistics.mean(seqs)
    res.adapters_per_step = statistics.mean(n_adapters)
    waits = [
        r.first_scheduled_time - r.arrival_time for r in reqs.values() if r.first_scheduled_time is not None
    ]
    res.longest_wait_steps = round(max(waits, default=0.0) / setup.step_s)
    if setup.high_share:
        res.high_started = _started([r for r in reqs.values() if r.priority < 0], setup.step_s)
        res.low_started = _started([r for r in reqs.values() if r.priority >= 0], setup.step_s)
    res.oldest_waiting_steps = round(
        max((clock.t - r.arrival_time for r in s.policy if r.first_scheduled_time is None), default=0.0)
        / setup.step_s
    )
    if setup.check_every:
        s.check_integrity()
    res.reservations = getattr(s.counters, "num_reservations", 0)
    res.preemptions = s.counters.num_preemptions
    return res


def _started(reqs: list[Request], step_s: float) -> tuple[float, float]:
    """(share of `reqs` scheduled at least once, their median wait to that in steps)."""
    waits = [
        (r.first_scheduled_time - r.arrival_time) / step_s for r in reqs if r.first_scheduled_time is not None
    ]
    return (len(waits) / len(reqs), statistics.median(waits)) if waits else (0.0, 0.0)


def _track_fair_stall(s: Scheduler, stall: dict[str, int], served: set[str], res: TraceResult) -> None:
    """Count the steps in a row that the tenant first in VTC's order (least counter, then oldest
    request) went unserved while it stayed first and another tenant was admitted instead."""
    counters = s.policy.counters  # type: ignore[attr-defined]
    top = min(((counters.get(r.tenant, 0.0), r.arrival_seq, r.tenant) for r in s.policy), default=None)
    tenant = None if top is None else top[2]
    for t in list(stall):
        if t != tenant:
            del stall[t]
    if tenant is not None and tenant not in served and served:
        stall[tenant] = stall.get(tenant, 0) + 1
        res.min_counter_stall_steps = max(res.min_counter_stall_steps, stall[tenant])
    elif tenant in served:
        stall.pop(tenant, None)
