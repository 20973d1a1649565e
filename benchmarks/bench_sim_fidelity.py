"""Simulator fidelity (issue 11): the simulator against the real engine, same workload, same run.

    python benchmarks/bench_sim_fidelity.py [--cache-dir DIR] [--rates 4 6] [--policies fcfs affinity]

Not a test. In one process, in this order:
1. the bench's mid model (91M parameters, random weights, fp32) and 100 rank-8 adapters on q_proj
   and v_proj (built in --cache-dir once);
2. a `Calibrator` on this machine, measured in slices between the real runs (the profile sees
   the machine in the same minutes as they do), on its own random load (bursts of 1-64 requests
   over 16 adapters of ranks 8 and 16, seed 0) with the workload's length ranges, as
   `loramux simulate calibrate --prompt-range 8 48 --output-range 8 48` does in one go;
3. for each rate and policy, S-LoRA's workload in online mode exactly as `loramux bench` runs it
   (seed 42, alpha 1, cv 1, --duration s, input and output U[8, 48), max_num_seqs 64,
   max_num_batched_tokens 2048, 1 GiB KV, --max-loras slots, each adapter its own tenant): the
   real engine in real time (`loramux.bench.systems.run_loramux`), --repeats times (the table
   shows the median: this machine's speed drifts), then the simulator on the same requests as
   many times, with jitter seeds 0, 1, ... (the table shows their median too).
Prints a Markdown table: throughput, TTFT p50, e2e p50 and adapter loads, real and simulated, and
the simulated / real ratio; then the machine's speed in each calibration slice against the
fitted profile (how far it drifted during the run). The real run's load count includes its
warm-up request's load; the simulator has no warm-up, so its first request for that adapter
loads it instead: the totals compare like with like.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

from loramux.bench.report import machine, summarize_run
from loramux.bench.systems import LoramuxSettings, make_prompts, run_loramux
from loramux.sim import metrics
from loramux.sim.calibrate import Calibrator
from loramux.sim.profile import StepFeatures
from loramux.sim.run import SimSettings, simulate
from loramux.sim.workloads import S1_RANKS, slora
from loramux.workload import WorkloadConfig, generate_requests


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache-dir", default="/tmp/loramux-fidelity")
    p.add_argument("--rates", nargs="+", type=float, default=[2.0, 3.0])
    p.add_argument("--policies", nargs="+", default=["fcfs", "fair"])
    p.add_argument(
        "--repeats", type=int, default=3, help="real runs per setting; the table shows their median"
    )
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--max-loras", type=int, default=16)
    p.add_argument("--calibration-requests", type=int, default=480)
    p.add_argument("--save-profile", default=None, help="also write the calibrated profile here")
    a = p.parse_args()
    from tqdm import tqdm

    from loramux.bench.artifacts import build_random_model, write_random_adapter

    cache = Path(a.cache_dir)
    model = build_random_model(cache / "llama-mid", "mid")
    adapters = [
        write_random_adapter(cache / "llama-mid-r8-qv" / f"a{i}", model, 8, ("q_proj", "v_proj"), seed=i)
        for i in tqdm(range(100), desc="adapters", leave=False)
    ]
    cal_adapters = [
        write_random_adapter(
            cache / "cal" / f"c{i}", model, 8 * (1 + i % 2), ("q_proj", "v_proj"), seed=1000 + i
        )
        for i in range(16)
    ]
    cal = Calibrator(model, cal_adapters, max_loras=a.max_loras, prompt_range=(8, 48), output_range=(8, 48))
    setups = [(rate, policy) for rate in a.rates for policy in a.policies]
    slice_n = -(-a.calibration_requests // (len(setups) * a.repeats + 1))
    cal.measure(slice_n, progress=False)
    bounds = [0, len(cal.times)]  # the steps of each calibration slice
    reals: dict[tuple[float, str], list] = {}
    for rate, policy in setups:  # real runs, each after a slice of calibration: same machine, same minutes
        cfg = WorkloadConfig(100, 1.0, rate, 1.0, a.duration, (8, 48), (8, 48), 42)
        reqs = generate_requests(cfg)
        prompts = make_prompts(reqs, 512)
        settings = LoramuxSettings(
            max_loras=a.max_loras, max_num_seqs=64, policy=policy, tenant_per_adapter=True
        )
        for _ in range(a.repeats):
            reals.setdefault((rate, policy), []).append(
                run_loramux(model, adapters, reqs, prompts, "online", settings)
            )
            cal.measure(slice_n, progress=False)
            bounds.append(len(cal.times))
    profile, q = cal.profile("cpu-mid")
    drift = []  # the machine's speed in each slice: measured / the profile's prediction, summed
    for lo, hi in itertools.pairwise(bounds):
        pred = sum(profile.step_seconds(StepFeatures(*f)) for f in cal.rows[lo:hi])
        drift.append(sum(cal.times[lo:hi]) / pred)
    cal.close()
    cal_s = q["seconds"]
    if a.save_profile:
        profile.save(a.save_profile)
    rows = []
    spread: list[list[tuple[float, float, float]]] = []
    for rate, policy in setups:
        cfg = WorkloadConfig(100, 1.0, rate, 1.0, a.duration, (8, 48), (8, 48), 42)
        wl = slora(cfg, S1_RANKS)  # tenant = adapter, as in the real runs
        sums = [summarize_run(r, 6.0) for r in reals[(rate, policy)]]
        spread.append([(s.requests_per_s, s.ttft_p50, s.e2e_p50) for s in sums])
        rs = dataclasses.replace(
            sums[0],
            requests_per_s=statistics.median(s.requests_per_s for s in sums),
            ttft_p50=statistics.median(s.ttft_p50 for s in sums),
            e2e_p50=statistics.median(s.e2e_p50 for s in sums),
        )
        loads = round(statistics.median(r.adapter_loads for r in reals[(rate, policy)]))
        sims = [  # as many simulated runs as real ones, each with its own jitter seed; their median
            simulate(
                wl,
                profile,
                SimSettings(
                    policy=policy,
                    max_num_seqs=64,
                    max_num_batched_tokens=2048,
                    max_loras=a.max_loras,
                    max_cpu_loras=256,
                    seed=seed,
                ),
            )
            for seed in range(a.repeats)
        ]
        rows.append(
            (
                rate,
                policy,
                rs,
                loads,
                sims,
                statistics.median(metrics.throughput(x.records) for x in sims),
                statistics.median(metrics.ttft_stats(x.records).p50 for x in sims),
                statistics.median(metrics.e2e_stats(x.records).p50 for x in sims),
            )
        )
    lines = [
        f"Command: `python benchmarks/bench_sim_fidelity.py {' '.join(sys.argv[1:])}`".replace(" `", " `", 1),
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Calibration in the same run, in slices "
        f"between the real runs: "
        f"{q['steps']:.0f} steps in {cal_s:.0f} s, R^2 {q['r2']:.3f}, median step error "
        f"{q['median_rel_error']:.1%}.",
        "",
        "| rate | policy | req/s real / sim | TTFT p50 (s) real / sim | e2e p50 (s) real / sim "
        "| adapter loads real / sim | sim / real: req/s, TTFT p50, e2e p50, loads |",
        "|---|---|---|---|---|---|---|",
    ]
    worst = []
    for rate, policy, rs, rl, sims, thr, ttft, e2e in rows:
        sim_loads = round(statistics.median(x.adapter_loads for x in sims))
        ratios = (thr / rs.requests_per_s, ttft / rs.ttft_p50, e2e / rs.e2e_p50, sim_loads / max(rl, 1))
        worst.append(ratios)
        lines.append(
            f"| {rate:g} | {policy} | {rs.requests_per_s:.2f} / {thr:.2f} | {rs.ttft_p50:.3f} / {ttft:.3f} | "
            f"{rs.e2e_p50:.3f} / {e2e:.3f} | {rl} / {sim_loads} | "
            + ", ".join(f"{x:.3f}" for x in ratios)
            + " |"
        )
    lines += [
        "",
        "Real runs, one by one (req/s, TTFT p50, e2e p50): "
        + "; ".join(
            f"{rate:g} {pol}: " + ", ".join(f"({x:.2f}, {y:.3f}, {z:.3f})" for x, y, z in sp)
            for (rate, pol, *_), sp in zip(rows, spread, strict=True)
        ),
        "",
        "The machine's speed in each calibration slice (measured step time / the profile's, in run "
        "order; a slice before the first real run and one after each): "
        + ", ".join(f"{d:.3f}" for d in drift),
    ]
    err = [max(abs(r[i] - 1) for r in worst) for i in range(4)]
    lines += [
        "",
        f"Largest error: throughput {err[0]:.1%}, TTFT p50 {err[1]:.1%}, e2e p50 {err[2]:.1%}, "
        f"adapter loads {err[3]:.1%} (targets 15 %, 15 %, 15 %, 10 %). Median simulation wall time "
        f"{statistics.median(x.wall_seconds for r in rows for x in r[4]):.2f} s per run.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
