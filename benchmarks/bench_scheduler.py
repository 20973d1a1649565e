"""Scheduler time per step at scale, and the quality of its decisions on issue 10's trace.

Two modes. The default times the scheduler under a steady load: 256 running,
4096 waiting, 1000 adapters, each policy. `--trace` replays the multi-LoRA
trace of issue 10 (loramux/bench/sched_trace.py: every request added before
step 1, 4096 requests, numpy seed 0) for each configuration (max_loras :
adapters = 32:1000, 4:1000, 32:32, no LoRA), skew a = 1.0 and 0.3, each
policy, with aging on and off, and prints tokens per step and the rest of
the decision metrics; `benchmarks/vllm_sched_trace.py` runs vLLM v1's
scheduler on the very same draws for the side-by-side column.

    python benchmarks/bench_scheduler.py --trace [--quick] [--trace-seeds 0 1 2 ...]

Not a test. Drives the real control plane with a trivial executor (every
sampled token is 1) and keeps the load steady: whenever requests finish, the
same number of new ones arrive, so 4096 stay waiting. Times `schedule()` and
`update_from_output()` separately (wall clock) and prints a markdown table; the
scheduler's own clock is virtual, 50 ms a step, so aging acts as in service.

    python benchmarks/bench_scheduler.py [--steps 400] [--policies fcfs affinity completion fair slo]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

from loramux.config import EngineConfig
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
    cfg = EngineConfig.create(
        "bench",
        max_num_seqs=running,
        max_num_batched_tokens=8192,
        max_prefill_tokens=4096,
        policy=policy,
        starvation_timeout_s=5.0,
        num_pages=running * 80,
        page_size=16,
        enable_prefix_caching=True,
        max_loras=max_loras,
        max_cpu_loras=max(4 * max_loras, 128),
        max_lora_rank=64,
    )
    c, lc = cfg.cache, cfg.lora
    kv = KVCacheManager.create(c.num_pages, c.page_size, c.enable_prefix_caching)  # type: ignore[arg-type]
    adapters = AdapterManager(lc.max_loras, lc.cpu_slots, lc.max_lora_rank)
    s = Scheduler(cfg.scheduler, kv, adapters, max_model_len=4096, clock=clock)
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


TRACE_CONFIGS = [(32, 1000), (4, 1000), (32, 32), (None, 0)]


def run_trace_matrix(policies: list[str], quick: bool, repeat: int = 1) -> None:
    """The issue-10 trace: every configuration, skew, policy, aging on and off; one markdown table.

    With `repeat` > 1 the aging-on run is repeated and the time column gives the best of the
    runs' medians and their range (timeit's rule: slower runs measure the machine's other load);
    the decisions of every repeat must be identical."""
    from loramux.bench.sched_trace import VLLM_TOKENS_PER_STEP, TraceSetup, run_trace

    kw = {"n_requests": 1024, "warmup_steps": 128, "steps": 100} if quick else {}
    print(
        "| config | a | policy | tokens/step | aging off | on/off | vLLM (issue) | seqs/step | "
        "adapters/step | completed | longest wait (steps) | out of order / admissions | "
        "least-served stall | reservations | not work-conserving | sched+update p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for max_loras, n_adapters in TRACE_CONFIGS:
        for power in (1.0, 0.3):
            for pol in policies:
                on = run_trace(TraceSetup(max_loras, n_adapters, power, pol, aging=True, **kw))
                times = [on.sched_ms_p50]
                for _ in range(repeat - 1):
                    again = run_trace(TraceSetup(max_loras, n_adapters, power, pol, aging=True, **kw))
                    assert again.tokens_per_step == on.tokens_per_step, "the trace is not deterministic"
                    times.append(again.sched_ms_p50)
                timing = f"{min(times):.3f}" + (f" ({min(times):.3f}-{max(times):.3f})" if repeat > 1 else "")
                off = run_trace(TraceSetup(max_loras, n_adapters, power, pol, aging=False, **kw))
                vllm = VLLM_TOKENS_PER_STEP[(max_loras, n_adapters)][power]
                stall = str(on.min_counter_stall_steps) if pol == "fair" else "-"
                print(
                    f"| {on.setup.label} | {power} | {pol} | {on.tokens_per_step:.1f} | "
                    f"{off.tokens_per_step:.1f} | {on.tokens_per_step / off.tokens_per_step:.3f} | {vllm} | "
                    f"{on.seqs_per_step:.1f} | {on.adapters_per_step:.1f} | {on.completed} | "
                    f"{on.longest_wait_steps} | {on.out_of_order} / {on.admissions} | {stall} | "
                    f"{on.reservations} | {on.not_work_conserving} | {timing} |",
                    flush=True,
                )


def run_trace_seeds(policies: list[str], seeds: list[int]) -> None:
    """Tokens per step on other draws of the trace (numpy seeds), LoRA configurations only, each
    policy beside fcfs (which makes vLLM v1's decisions on seed 0, `vllm_sched_trace.py`); a last
    row per configuration sums the seeds. How much of one draw's ranking is the draw's."""
    from loramux.bench.sched_trace import TraceSetup, run_trace

    others = [p for p in policies if p != "fcfs"]
    print("| config | a | seed | fcfs | " + " | ".join(f"{p} | {p} / fcfs" for p in others) + " |")
    print("|---" * (4 + 2 * len(others)) + "|")
    for max_loras, n_adapters in TRACE_CONFIGS[:3]:
        for power in (1.0, 0.3):
            totals = dict.fromkeys(["fcfs", *others], 0.0)
            for seed in seeds:
                got = {
                    p: run_trace(TraceSetup(max_loras, n_adapters, power, p, seed=seed)).tokens_per_step
                    for p in ["fcfs", *others]
                }
                for p, v in got.items():
                    totals[p] += v
                cells = " | ".join(f"{got[p]:.1f} | {got[p] / got['fcfs']:.3f}" for p in others)
                print(
                    f"| {max_loras}:{n_adapters} | {power} | {seed} | {got['fcfs']:.1f} | {cells} |",
                    flush=True,
                )
            cells = " | ".join(f"{totals[p]:.1f} | {totals[p] / totals['fcfs']:.3f}" for p in others)
            print(
                f"| {max_loras}:{n_adapters} | {power} | sum | {totals['fcfs']:.1f} | {cells} |", flush=True
            )


def _trace_module():
    """loramux/bench/sched_trace.py of this checkout, loaded by path: with PYTHONPATH pointing at
    another checkout, it replays the trace through that checkout's scheduler."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "loramux" / "bench" / "sched_trace.py"
    spec = importlib.util.spec_from_file_location("_sched_trace", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = mod  # type: ignore[union-attr]  # dataclasses look their module up
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def run_one(spec: str) -> None:
    """Run one trace setup (JSON) and print its result as JSON: the baseline's subprocess."""
    import dataclasses
    import json

    st = _trace_module()
    r = st.run_trace(st.TraceSetup(**json.loads(spec)))
    print(json.dumps({k: v for k, v in dataclasses.asdict(r).items() if k != "setup"}))


def run_baseline_comparison(policies: list[str], baseline: str) -> None:
    """The trace through this checkout's scheduler and through `baseline`'s, one after the other
    for every setup (each in its own process), with max_cpu_loras=128 (the older default crashed)."""
    import json
    import os
    import subprocess
    import sys

    def run(setup: dict, where: str | None) -> dict:
        env = dict(os.environ)
        if where is not None:
            env["PYTHONPATH"] = where
        cmd = [sys.executable, __file__, "--trace-one", json.dumps(setup)]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)

    print(
        "| config | a | policy | aging | tokens/step now | before | longest wait now | before | "
        "oldest still waiting now | before | out of order now | before | sched+update p50 ms now | before |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for max_loras, n_adapters in TRACE_CONFIGS[:3]:
        for power in (1.0, 0.3):
            for pol in policies:
                for aging in (True, False):
                    setup = dict(
                        max_loras=max_loras,
                        n_adapters=n_adapters,
                        power=power,
                        policy=pol,
                        aging=aging,
                        max_cpu_loras=128,
                    )
                    now, before = run(setup, None), run(setup, baseline)
                    label = f"{max_loras}:{n_adapters}"
                    cells = [
                        f"{now['tokens_per_step']:.1f} | {before['tokens_per_step']:.1f}",
                        f"{now['longest_wait_steps']} | {before['longest_wait_steps']}",
                        f"{now['oldest_waiting_steps']} | {before['oldest_waiting_steps']}",
                        f"{now['out_of_order']} | {before['out_of_order']}",
                        f"{now['sched_ms_p50']:.3f} | {before['sched_ms_p50']:.3f}",
                    ]
                    print(
                        f"| {label} | {power} | {pol} | {'on' if aging else 'off'} | "
                        + " | ".join(cells)
                        + " |",
                        flush=True,
                    )


def run_trace_checks(policies: list[str]) -> None:
    """Full-length trace runs with default settings and with max_cpu_loras == max_loras, checking
    integrity every 8 steps and at the end, and work conservation every step."""
    from loramux.bench.sched_trace import TraceSetup, run_trace

    print("| config | a | policy | host adapters | steps | completed | integrity | not work-conserving |")
    print("|---|---|---|---|---|---|---|---|")
    for max_loras, n_adapters in TRACE_CONFIGS[:3]:
        for power in (1.0, 0.3):
            for pol in policies:
                for host in (None, max_loras):
                    setup = TraceSetup(max_loras, n_adapters, power, pol, max_cpu_loras=host, check_every=8)
                    r = run_trace(setup)  # raises on a crash or a broken invariant
                    steps = setup.warmup_steps + setup.steps
                    print(
                        f"| {setup.label} | {power} | {pol} | {host or 'default'} | {steps} | "
                        f"{r.completed} | ok | {r.not_work_conserving} |",
                        flush=True,
                    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", action="store_true", help="replay issue 10's trace instead of timing")
    p.add_argument("--quick", action="store_true", help="with --trace: 1024 requests, 228 steps (smoke test)")
    p.add_argument("--check", action="store_true", help="with --trace: full runs with integrity checks")
    p.add_argument(
        "--baseline",
        default=None,
        metavar="CHECKOUT",
        help="with --trace: run each setup here and in this other checkout (a git worktree), side by side",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="with --trace: run each aging-on setup this often (best median)"
    )
    p.add_argument("--trace-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--running", type=int, default=256)
    p.add_argument("--waiting", type=int, default=4096)
    p.add_argument("--max-loras", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trace-seeds", type=int, nargs="+", help="with --trace: tokens per step on these draws of the trace"
    )
    p.add_argument("--policies", nargs="+", default=["fcfs", "affinity", "completion", "fair", "slo"])
    a = p.parse_args()
    if a.trace_one is not None:
        run_one(a.trace_one)
        return
    if a.trace and a.baseline:
        print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
        run_baseline_comparison(a.policies, a.baseline)
        return
    if a.trace:
        print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
        if a.check:
            run_trace_checks(a.policies)
        elif a.trace_seeds:
            run_trace_seeds(a.policies, a.trace_seeds)
        else:
            run_trace_matrix(a.policies, a.quick, a.repeat)
        return
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
