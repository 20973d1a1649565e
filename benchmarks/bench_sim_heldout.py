"""Held-out validation of the simulator (issue 25): fit on one workload's step log, predict others.

    python benchmarks/bench_sim_heldout.py [--cache-dir DIR] [--repeats 5] [--duration 30]

Not a test. In one process:
1. the bench's mid model (91M parameters, random weights, fp32) and 100 adapters on q_proj and
   v_proj whose rank is ranks[i % len(ranks)] for each workload's ranks (built once in --cache-dir);
2. the fit: one real online run of the fit workload with the engine's step log on, then
   `profile_from_log` (what `loramux simulate calibrate --from-log` does): the cost model is
   measured on serving itself, not on a synthetic calibration load;
3. for each held-out workload, which differ from the fit in arrival cv, adapter count and ranks,
   whether max_loras binds, prompt and output lengths, policy, and load (one is overloaded, so its
   throughput is not capped by the offered rate): --repeats real runs (in real time, interleaved
   across workloads so the machine's drift spreads over all of them) and as many simulated runs
   with jitter seeds 0, 1, ..., each side's median compared.
Prints a Markdown table (real / simulated, and the ratio) with the issue's targets.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loramux.bench.report import machine, summarize_run
from loramux.bench.systems import LoramuxSettings, make_prompts, run_loramux
from loramux.sim import metrics
from loramux.sim.calibrate import profile_from_log
from loramux.sim.run import SimSettings, simulate
from loramux.sim.workloads import slora
from loramux.workload import WorkloadConfig, generate_requests


@dataclass(frozen=True)
class Case:
    name: str
    rate: float
    cv: float
    adapters: int
    ranks: tuple[int, ...]
    alpha: float
    max_loras: int
    policy: str
    inputs: tuple[int, int]
    outputs: tuple[int, int]


FIT = Case("fit: S-LoRA, Poisson", 2.0, 1.0, 16, (8, 16), 1.0, 16, "fcfs", (8, 48), (8, 48))
HELD_OUT = [
    Case("bursty, max_loras binds", 1.2, 3.0, 40, (8, 16, 32), 1.1, 4, "affinity", (8, 96), (8, 96)),
    Case("fair, long outputs", 1.2, 1.0, 24, (16,), 1.0, 16, "fair", (16, 64), (8, 160)),
    Case("overloaded, 100 adapters", 6.0, 1.0, 100, (8,), 1.0, 32, "fcfs", (8, 48), (8, 48)),
]  # fmt: skip


def p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else float("nan")


def real_stats(run) -> dict[str, float]:
    s = summarize_run(run, 6.0)
    done = [r for r in run.records if r.finish is not None]
    return {
        "req/s": s.requests_per_s,
        "TTFT p50": s.ttft_p50,
        "TTFT p90": p90([r.first_token - r.arrival for r in done if r.first_token is not None]),
        "e2e p50": s.e2e_p50,
        "e2e p90": p90([r.finish - r.arrival for r in done]),
        "loads": float(run.adapter_loads),
    }


def sim_stats(res) -> dict[str, float]:
    recs = res.records
    done = [r for r in recs if r.finish is not None]
    return {
        "req/s": metrics.throughput(recs),
        "TTFT p50": metrics.ttft_stats(recs).p50,
        "TTFT p90": p90([r.first_token - r.arrival for r in done if r.first_token is not None]),
        "e2e p50": metrics.e2e_stats(recs).p50,
        "e2e p90": p90([r.finish - r.arrival for r in done]),
        "loads": float(res.adapter_loads),
    }


KEYS = ("req/s", "TTFT p50", "TTFT p90", "e2e p50", "e2e p90", "loads")
TARGETS = {"TTFT p50": 0.15, "e2e p50": 0.15, "TTFT p90": 0.25, "e2e p90": 0.25, "loads": 0.10}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default="/tmp/loramux-fidelity")
    p.add_argument("--repeats", type=int, default=5, help="real runs and simulated seeds per workload")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals in each run")
    p.add_argument("--save-profile", default=None, help="also write the fitted profile here")
    a = p.parse_args()
    from loramux.bench.artifacts import build_random_model, write_random_adapter

    cache = Path(a.cache_dir)
    model = build_random_model(cache / "llama-mid", "mid")

    def adapters(case: Case) -> list[Path]:
        return [
            write_random_adapter(
                cache / f"heldout-r{case.ranks[i % len(case.ranks)]}" / f"a{i}",
                model,
                case.ranks[i % len(case.ranks)],
                ("q_proj", "v_proj"),
                seed=i,
            )
            for i in range(case.adapters)
        ]

    def config(case: Case) -> WorkloadConfig:
        return WorkloadConfig(
            case.adapters, case.alpha, case.rate, case.cv, a.duration, case.inputs, case.outputs, 42
        )

    def settings(case: Case, log: str | None = None) -> LoramuxSettings:
        return LoramuxSettings(
            max_loras=case.max_loras,
            max_lora_rank=max(case.ranks),
            max_num_seqs=64,
            policy=case.policy,
            tenant_per_adapter=True,
            step_log=log,
        )

    def run_real(case: Case, log: str | None = None):
        reqs = generate_requests(config(case))
        return run_loramux(
            model, adapters(case), reqs, make_prompts(reqs, 512), "online", settings(case, log)
        )

    log = cache / "heldout-fit-steps.jsonl"
    t0 = time.perf_counter()
    fit_run = run_real(FIT, str(log))
    profile, q = profile_from_log(log, "cpu-mid-from-log")
    if a.save_profile:
        profile.save(a.save_profile)
    cases = [FIT, *HELD_OUT]
    reals: dict[str, list[dict[str, float]]] = {FIT.name: [real_stats(fit_run)]}
    for _ in range(a.repeats):  # interleaved: each round runs every held-out workload once
        for case in HELD_OUT:
            reals.setdefault(case.name, []).append(real_stats(run_real(case)))
    real_s = time.perf_counter() - t0
    rows = []
    worst: dict[str, float] = {}
    for case in cases:
        wl = slora(config(case), case.ranks)
        sims = [
            sim_stats(
                simulate(
                    wl,
                    profile,
                    SimSettings(
                        policy=case.policy,
                        max_num_seqs=64,
                        max_num_batched_tokens=2048,
                        max_loras=case.max_loras,
                        max_cpu_loras=256,
                        seed=seed,
                    ),
                )
            )
            for seed in range(a.repeats)
        ]
        real = {k: statistics.median(r[k] for r in reals[case.name]) for k in KEYS}
        sim = {k: statistics.median(s[k] for s in sims) for k in KEYS}
        ratio = {k: sim[k] / real[k] if real[k] else float("nan") for k in KEYS}
        if case is not FIT:
            for k in KEYS:
                worst[f"{k}"] = max(worst.get(k, 0.0), abs(ratio[k] - 1))
        rows.append((case, real, sim, ratio, len(reals[case.name])))
    lines = [
        f"Command: `python benchmarks/bench_sim_heldout.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Fit from the step log of one real "
        f"run of the fit workload: {q.get('steps', 0):.0f} steps, R^2 {q.get('r2', float('nan')):.3f}, "
        f"median step error {q.get('median_rel_error', float('nan')):.1%}. Real runs took {real_s:.0f} s.",
        "",
        "| workload | rate, cv | adapters (ranks), max_loras, policy | real runs | "
        + " | ".join(f"{k} real / sim (ratio)" for k in KEYS)
        + " |",
        "|---|---|---|---|" + "---|" * len(KEYS),
    ]
    for case, real, sim, ratio, n in rows:
        lines.append(
            f"| {case.name} | {case.rate:g}, {case.cv:g} | "
            f"{case.adapters} ({'/'.join(map(str, case.ranks))}), "
            f"{case.max_loras}, {case.policy} | {n} | "
            + " | ".join(f"{real[k]:.3g} / {sim[k]:.3g} ({ratio[k]:.2f})" for k in KEYS)
            + " |"
        )
    lines += [
        "",
        "Largest held-out error: "
        + ", ".join(
            f"{k} {v:.1%}" + (f" (target {TARGETS[k]:.0%})" if k in TARGETS else "") for k, v in worst.items()
        )
        + "; throughput target 10 % on the overloaded workload.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
