"""Run a workload through the real engine on a virtual clock.

Boundary: builds the engine itself (`LLMEngine`, so the same `Scheduler`,
policy, `AdapterManager`, `KVCacheManager` and prefix cache that serve real
traffic) with `CostModelExecutor` in place of the model, and drives it the
way the online benchmark drives the real one: requests whose arrival time has
come are added, one step runs, its tokens are recorded at the clock's time
after the step; when nothing is left to run the clock jumps to the next
arrival. Nothing here decides what runs: no policy is copied.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from loramux.config import EngineConfig, SchedulerConfig
from loramux.core.request import RequestStatus
from loramux.engine.llm_engine import LLMEngine
from loramux.sampling_params import SamplingParams
from loramux.sim.executor import CostModelExecutor, SimAdapterSpec, VirtualClock
from loramux.sim.profile import Profile
from loramux.sim.workloads import Workload
from loramux.workload import adapter_name

VOCAB = 32000


@dataclass(frozen=True)
class SimSettings:
    """The engine settings a simulation runs with (the names of `loramux serve`'s flags)."""

    policy: str = "fcfs"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_loras: int = 4
    max_cpu_loras: int | None = None
    max_lora_rank: int = 64
    num_pages: int | None = None  # None: the profile's pool
    enable_prefix_caching: bool = True
    starvation_timeout_s: float = 5.0
    ttft_slo_s: float = SchedulerConfig.ttft_slo_s  # the slo policy's target (the report's SLO)
    slo_wait_factor: float = SchedulerConfig.slo_wait_factor
    kv_watermark: float | None = None  # None: the policy's own (SchedulerConfig.kv_watermark)
    abort_after: float | None = None  # S-LoRA's early abort: a request waiting this long is dropped
    seed: int = 0  # prompt token ids and step-time jitter
    max_steps: int = 50_000_000
    step_log: str | None = None  # write the engine's step log here (virtual seconds)

    def __post_init__(self) -> None:
        if self.abort_after is not None and self.abort_after <= 0:
            raise ValueError(f"abort_after={self.abort_after}; it must be positive (or None: no abort)")


@dataclass
class Record:
    """One request as a client saw it (seconds on the virtual clock)."""

    index: int
    adapter: int | None
    tenant: str
    arrival: float
    input_len: int
    output_len: int
    first_scheduled: float | None = None
    first_token: float | None = None
    finish: float | None = None
    output_tokens: int = 0
    aborted: bool = False


@dataclass
class SimResult:
    workload: str
    policy: str
    profile: str
    records: list[Record]
    end_time: float  # virtual seconds at the last event
    steps: int
    adapter_loads: int  # swap-ins: copies into a device slot
    host_loads: int  # disk reads
    preemptions: int
    wall_seconds: float  # real time the simulation took
    load_seconds: tuple[float, float, float] = (0.0, 0.0, 0.0)  # read, copy, waiting for reads
    extra: dict[str, object] = field(default_factory=dict)


def build_engine(
    profile: Profile, settings: SimSettings
) -> tuple[LLMEngine, CostModelExecutor, VirtualClock]:
    s = settings
    clock = VirtualClock()
    executor = CostModelExecutor(profile, clock, VOCAB, seed=s.seed)
    if s.num_pages is not None:
        executor.num_pages = s.num_pages
    config = EngineConfig.create(
        f"sim:{profile.name}",
        max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        policy=s.policy,
        starvation_timeout_s=s.starvation_timeout_s,
        ttft_slo_s=s.ttft_slo_s,
        slo_wait_factor=s.slo_wait_factor,
        kv_watermark=s.kv_watermark,
        page_size=profile.page_size,
        num_pages=executor.num_pages,
        enable_prefix_caching=s.enable_prefix_caching,
        max_loras=s.max_loras,
        max_cpu_loras=s.max_cpu_loras,
        max_lora_rank=s.max_lora_rank,
        step_log=s.step_log,
    )
    engine = LLMEngine(config, executor=executor, tokenizer=None, clock=clock)
    return engine, executor, clock


def simulate(workload: Workload, profile: Profile, settings: SimSettings) -> SimResult:
    """Serve `workload` on the virtual clock; every request produces exactly its output length."""
    wall0 = time.perf_counter()
    engine, executor, clock = build_engine(profile, settings)
    for i in range(workload.num_adapters):
        rank, nbytes = workload.rank(i), workload.adapter_nbytes(i)
        nbytes = profile.adapter_bytes(rank) if nbytes is None else nbytes
        executor.specs[adapter_name(i)] = SimAdapterSpec("v1", rank, nbytes)
        engine.add_lora(adapter_name(i), adapter_name(i))
    rng = np.random.default_rng(settings.seed)
    records = {
        r.index: Record(r.index, r.adapter, r.tenant, r.arrival, r.input_len, r.output_len)
        for r in workload.requests
    }
    pending = deque(sorted(workload.requests, key=lambda r: (r.arrival, r.index)))
    params: dict[int, SamplingParams] = {}
    steps = 0
    while pending or engine.has_unfinished_requests():
        now = clock()
        while pending and pending[0].arrival <= now:
            r = pending.popleft()
            p = params.get(r.output_len)
            if p is None:
                p = params[r.output_len] = SamplingParams(
                    max_tokens=r.output_len,
                    ignore_eos=True,
                    temperature=0.0,
                    max_queue_time=settings.abort_after,
                )
            prompt = rng.integers(3, VOCAB, r.input_len).tolist()
            engine.add_request(
                f"r{r.index}",
                prompt,
                p,
                lora_name=None if r.adapter is None else adapter_name(r.adapter),
                arrival_time=r.arrival,
                tenant=r.tenant,
            )
        if not engine.has_unfinished_requests():
            clock.advance_to(pending[0].arrival)
            continue
        outs = engine.step()
        steps += 1
        if steps > settings.max_steps:
            raise RuntimeError(f"{workload.name}: more than {settings.max_steps} steps; raise max_steps")
        t = clock()
        if t == now:  # nothing ran (e.g. every waiting request needs a slot being freed): idle a tick
            clock.advance_to(now + max(profile.base_s, 1e-4))
        for out in outs:
            rec = records[int(out.request_id[1:])]
            if out.outputs[0].token_ids and rec.first_token is None:
                rec.first_token = t
            if rec.first_scheduled is None and out.metrics is not None:
                rec.first_scheduled = out.metrics.first_scheduled_time
            if out.finished:
                rec.finish = t
                rec.output_tokens = len(out.outputs[0].token_ids)
                rec.aborted = out.outputs[0].finish_reason not in ("length", "stop")
    if engine.step_log is not None:
        engine.step_log.close()
    snap = engine.snapshot()
    st = executor.load_stats
    return SimResult(
        workload.name,
        settings.policy,
        profile.name,
        list(records.values()),
        clock(),
        steps,
        int(snap.counters["device_loads"]),
        int(snap.counters["host_loads"]),
        int(snap.counters["preemptions"]),
        time.perf_counter() - wall0,
        (st.host_seconds, st.device_seconds, st.wait_seconds),
        {"timeouts": snap.finished.get(RequestStatus.FINISHED_TIMEOUT.finish_reason or "", 0)},
    )
