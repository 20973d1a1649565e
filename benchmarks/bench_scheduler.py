"""Scheduler time per step at scale: 256 running, 4096 waiting, 1000 adapters, each policy.

Not a test. Drives the real control plane with a trivial executor (every
sampled token is 1) and keeps the load steady: whenever requests finish, the
same number of new ones arrive, so 4096 stay waiting. Times `schedule()` and
`update_from_output()` separately (wall clock) and prints a markdown table; the
scheduler's own clock is virtual, 50 ms a step, so aging acts as in service.

    python benchmarks/bench_scheduler.py [--steps 400] [--policies fcfs affinity completion fair]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

from loramux.config import SchedulerConfig
from loramux.core import AdapterManager, KVCacheManager, Request, RunnerOutput, Scheduler


class VirtualClock:
    """Step time as a real engine would see it (50 ms a step), so aging behaves as in service."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def build(
    policy: str, n_adapters: int, running: int, waiting: int, max_loras: int, seed: int, clock: VirtualClock
):
    cfg = SchedulerConfig(
        max_num_seqs=running,
        max_num_batched_tokens=8192,
        max_prefill_tokens=4096,
        policy=policy,
        starvation_timeout_s=5.0,
    )
    kv = KVCacheManager.create(num_pages=running * 80, page_size=16, enable_prefix_caching=True)
    adapters = AdapterManager(max_loras, max_cpu_loras=max(4 * max_loras, 128), max_lora_rank=64)
    s = Scheduler(cfg, kv, adapters, max_model_len=4096, clock=clock)
    for i in range(n_adapters):
        s.register_adapter(f"a{i}", version="v1", rank=8, nbytes=1 << 20)
    rng = random.Random(seed)
    ids = iter(range(10**9))

    def new_request() -> Request:
        k = min(int(rng.paretovariate(1.2)) - 1, n_adapters - 1)  # skewed popularity
        lora = f"a{k}" if rng.random() < 0.9 else None
        return Request(
            f"r{next(ids)}",
            [rng.randrange(1, 30000) for _ in range(rng.randint(16, 256))],
            max_tokens=rng.randint(16, 512),
            lora_name=lora,
            arrival_time=clock.t,
            ignore_eos=True,
        )

    for _ in range(running + waiting):
        s.add_request(new_request())
    return s, new_request


def run_policy(
    policy: str, steps: int, n_adapters: int, running: int, waiting: int, max_loras: int, seed: int
) -> dict[str, float]:
    clock = VirtualClock()
    s, new_request = build(policy, n_adapters, running, waiting, max_loras, seed, clock)
    sched_t, update_t, n_running, n_adapters_step = [], [], [], []
    warm = 0
    while len(s.running) < running and warm < 2000:  # fill the running batch first
        out = s.schedule()
        s.update_from_output(out, RunnerOutput([1 if q.sample else None for q in out.seqs]))
        warm += 1
        clock.t += 0.05
    for _ in range(steps):
        t0 = time.perf_counter()
        out = s.schedule()
        t1 = time.perf_counter()
        upd = s.update_from_output(out, RunnerOutput([1 if q.sample else None for q in out.seqs]))
        t2 = time.perf_counter()
        sched_t.append(t1 - t0)
        update_t.append(t2 - t1)
        n_running.append(len(out.seqs))
        n_adapters_step.append(len(out.adapter_uids))
        for _ in upd.finished:
            s.add_request(new_request())
        clock.t += 0.05
    q = statistics.quantiles
    return {
        "schedule_p50_ms": 1e3 * statistics.median(sched_t),
        "schedule_p99_ms": 1e3 * q(sched_t, n=100)[98],
        "update_p50_ms": 1e3 * statistics.median(update_t),
        "seqs_per_step": statistics.mean(n_running),
        "waiting": s.num_waiting,
        "adapters_per_step": statistics.mean(n_adapters_step),
        "device_loads": s.adapters.num_device_loads,
        "warmup_steps": warm,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--running", type=int, default=256)
    p.add_argument("--waiting", type=int, default=4096)
    p.add_argument("--max-loras", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policies", nargs="+", default=["fcfs", "affinity", "completion", "fair"])
    a = p.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
        f"{a.running} running, {a.waiting} waiting, {a.adapters} adapters, max_loras={a.max_loras}, "
        f"{a.steps} timed steps"
    )
    print(
        "| policy | schedule() p50 ms | schedule() p99 ms | update p50 ms | seqs/step | "
        "waiting at end | adapters/step | device loads |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for pol in a.policies:
        r = run_policy(pol, a.steps, a.adapters, a.running, a.waiting, a.max_loras, a.seed)
        print(
            f"| {pol} | {r['schedule_p50_ms']:.3f} | {r['schedule_p99_ms']:.3f} | "
            f"{r['update_p50_ms']:.3f} | {r['seqs_per_step']:.0f} | {r['waiting']} | "
            f"{r['adapters_per_step']:.1f} | {r['device_loads']} |"
        )


if __name__ == "__main__":
    main()
