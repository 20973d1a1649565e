"""The simulator's executor: answers a step at once and moves a virtual clock by its predicted cost.

Boundary: it implements the engine's Executor protocol (inspect and register
adapters, apply the adapter plan, count pending reads, execute a step) with
no model. Tokens: every sampled token is `token_id` (requests run with
ignore_eos, so their lengths decide when they end, as in S-LoRA's clients).
Time: a step starts at the clock's time, waits for any adapter it copies
into a slot whose disk read has not finished, pays the copy, then the step's
cost from the profile (times a seeded jitter factor of mean 1, when the
profile has one); reads run one at a time on a virtual reader thread
from the moment the plan asks for them, as the real executor's do.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from loramux.core.adapters import AdapterPlan
from loramux.core.outputs import RunnerOutput, SchedulerOutput
from loramux.sim.profile import Profile, step_features


class VirtualClock:
    """Seconds since the simulation started; only the simulator moves it."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance_to(self, t: float) -> None:
        if t > self.t:
            self.t = t


@dataclass(frozen=True)
class SimAdapterSpec:
    version: str
    rank: int
    nbytes: int


@dataclass
class SimLoadStats:
    host_loads: int = 0
    device_loads: int = 0
    host_seconds: float = 0.0
    device_seconds: float = 0.0
    wait_seconds: float = 0.0


class CostModelExecutor:
    def __init__(
        self, profile: Profile, clock: VirtualClock, vocab_size: int = 32000, token_id: int = 1, seed: int = 0
    ) -> None:
        self.profile = profile
        self._rng = random.Random(seed)  # step-time jitter (profile.jitter), one draw per step
        self._sigma = profile.jitter
        self.clock = clock
        self.num_pages = profile.num_pages
        self.max_model_len = profile.max_model_len
        self.vocab_size = vocab_size
        self.token_id = token_id
        self.commits_kv_as_used = profile.commits_kv_as_used
        self.device = "sim"
        self.specs: dict[str, SimAdapterSpec] = {}  # by name, set by the simulator before add_lora
        self._by_uid: dict[int, SimAdapterSpec] = {}
        self._rank: dict[int, int] = {}
        self._read_done: dict[int, float] = {}  # uid -> virtual time its host copy is complete
        self._reader_free = 0.0
        self.load_stats = SimLoadStats()
        self.num_steps = 0

    # --- adapters ---
    def inspect_adapter(self, name: str, path: str | None) -> SimAdapterSpec:
        spec = self.specs.get(name)
        if spec is None:
            raise ValueError(f"the simulator knows no adapter {name!r}; give it a rank first")
        return spec

    def register_adapter(self, uid: int, spec: SimAdapterSpec) -> None:
        self._by_uid[uid] = spec
        self._rank[uid] = spec.rank

    def pending_reads(self, uids: Iterable[int]) -> int:
        now = self.clock()
        return sum(1 for u in uids if self._read_done.get(u, 0.0) > now)

    def apply_adapter_plan(self, plan: AdapterPlan) -> float:
        """Carry out the plan at the clock's time; returns when the step may start its forward."""
        if plan.empty:
            return self.clock()
        p, stats = self.profile, self.load_stats
        for uid in plan.release:
            self._read_done.pop(uid, None)
            self._by_uid.pop(uid, None)
        for uid in plan.evict_host:
            self._read_done.pop(uid, None)
        now = self.clock()
        for uid in plan.load_host:  # queued on the one reader thread
            dt = p.read_seconds(self._by_uid[uid].nbytes)
            start = max(self._reader_free, now)
            self._reader_free = self._read_done[uid] = start + dt
            stats.host_seconds += dt
            stats.host_loads += 1
        t = now
        for uid, _ in plan.load_device:
            ready = self._read_done.get(uid, 0.0)
            if ready > t:
                stats.wait_seconds += ready - t
                t = ready
            dt = p.copy_seconds(self._by_uid[uid].nbytes)
            t += dt
            stats.device_seconds += dt
            stats.device_loads += 1
        return t

    # --- the step ---
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        t = self.apply_adapter_plan(out.adapter_plan)
        self.num_steps += 1
        if out.seqs:
            cost = self.profile.step_seconds(step_features(out, self._rank))
            if self._sigma:
                cost *= math.exp(self._rng.gauss(-0.5 * self._sigma**2, self._sigma))  # mean 1
            t += cost
        self.clock.advance_to(t)
        tok = self.token_id
        return RunnerOutput([tok if s.sample else None for s in out.seqs])
