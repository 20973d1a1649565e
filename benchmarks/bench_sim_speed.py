"""Simulator speed (issue 11): wall time against simulated requests, on W1's settings.

    python benchmarks/bench_sim_speed.py [--durations 75 150 300 600 1200] [--rate 2.5] [--repeats 3]

Not a test. S-LoRA's generator (n = 200, alpha 1, cv 1, S2 ranks, seed 42) at --rate for each
duration, simulated under fcfs on the a10g-llama7b profile with W1's engine settings; the median
of --repeats runs. Prints a Markdown table: requests, steps, wall seconds, microseconds per
request and per step. W1 itself is the 300 s row.
"""

from __future__ import annotations

import argparse
import statistics
import time

from loramux.sim.profile import Profile
from loramux.sim.run import SimSettings, simulate
from loramux.sim.workloads import S2_RANKS, SUITES, slora
from loramux.workload import WorkloadConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--durations", nargs="+", type=float, default=[75, 150, 300, 600, 1200])
    p.add_argument("--rate", type=float, default=2.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--policy", default="fcfs")
    a = p.parse_args()
    suite = SUITES["slora-a10g-sweep"]
    profile = Profile.load(suite.profile)
    settings = SimSettings(policy=a.policy, **suite.engine)  # type: ignore[arg-type]
    lines = [
        "| trace s | requests | steps | wall s (median) | us per request | us per step |",
        "|---|---|---|---|---|---|",
    ]
    for d in a.durations:
        wl = slora(WorkloadConfig(200, 1.0, a.rate, 1.0, d, seed=42), S2_RANKS)
        walls, steps = [], 0
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            res = simulate(wl, profile, settings)
            walls.append(time.perf_counter() - t0)
            steps = res.steps
        w = statistics.median(walls)
        n = len(wl.requests)
        lines.append(f"| {d:g} | {n} | {steps} | {w:.2f} | {w / n * 1e6:.0f} | {w / steps * 1e6:.0f} |")
    print(f"Command: `python benchmarks/bench_sim_speed.py --rate {a.rate:g} --policy {a.policy}`\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
