"""vLLM's priority scheduling on issue 10's trace: what `--policy priority` buys a request class
of better priority, and what it costs the rest and the machine, against fcfs on the same draws.

Not a test. A share of the trace's requests (`--high-share`, drawn apart so the trace itself is
unchanged) gets priority -1, the rest 0; every request arrives before step 1 (the trace's
overload), so a wait is a place in the queue. For each configuration (max_loras : adapters) and
skew, fcfs and priority run the same trace; the table gives tokens per step, the share of each
class started by the end and their median wait to the first step, preemptions and the
scheduler's time per step.

    python benchmarks/bench_priority.py [--high-share 0.1] [--quick]
"""

from __future__ import annotations

import argparse
import platform

from loramux.bench.sched_trace import TraceSetup, run_trace

CONFIGS = ((32, 1000), (4, 1000), (32, 32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--high-share", type=float, default=0.1, help="share of requests at priority -1")
    p.add_argument("--quick", action="store_true", help="1024 requests, 228 steps (a smoke run)")
    a = p.parse_args()
    size = dict(n_requests=1024, warmup_steps=28, steps=200) if a.quick else {}
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"high share {a.high_share}")
    print(
        "| config | a | policy | tokens/step | priority -1: started, p50 wait (steps) | priority 0: started, "
        "p50 wait (steps) | preemptions | sched+update p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for max_loras, n_adapters in CONFIGS:
        for power in (1.0, 0.3):
            for policy in ("fcfs", "priority"):
                setup = TraceSetup(max_loras, n_adapters, power, policy, high_share=a.high_share, **size)
                r = run_trace(setup)
                hi, lo = r.high_started, r.low_started
                print(
                    f"| {setup.label} | {power} | {policy} | {r.tokens_per_step:.1f} | "
                    f"{hi[0]:.0%}, {hi[1]:.0f} | {lo[0]:.0%}, {lo[1]:.0f} | {r.preemptions} | "
                    f"{r.sched_ms_p50:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
