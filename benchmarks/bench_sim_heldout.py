"""Held-out validation of the simulator (issue 25): fit on one workload's step log, predict others.

    python benchmarks/bench_sim_heldout.py [--cache-dir DIR] [--repeats 5] [--duration 30]
                                           [--reuse] [--select-terms]

Not a test. In one process:
1. the bench's mid model (91M parameters, random weights, fp32) and 100 adapters on q_proj and
   v_proj whose rank is ranks[i % len(ranks)] for each workload's ranks (built once in --cache-dir);
2. the fit: one real online run of the fit workload with the engine's step log on, then
   `profile_from_log` (what `loramux simulate calibrate --from-log` does). The fit workload is a
   ramp: Poisson arrivals whose rate steps up past the engine's capacity and back down, so its
   log holds every batch size serving makes, from one row to a full step;
3. for each held-out workload, which differ from the fit in arrival cv, adapter count and ranks,
   whether max_loras binds, prompt and output lengths, policy, and load (one is overloaded, so its
   throughput is not capped by the offered rate): --repeats real runs (in real time, interleaved
   across workloads so the machine's drift spreads over all of them) and as many simulated runs
   with jitter seeds 0, 1, ..., each side's median compared.
Prints a Markdown table (real / simulated, and the ratio) with the issue's targets, and, for each
linear cost term, the held-out error with that term left out of the fit: the rule is that a term
stays only if it lowers the held-out error. --select-terms also runs the backward elimination
that rule implies and reports the model it keeps. The real runs' numbers and the fit's log are
kept in --cache-dir; --reuse refits and resimulates from them without running the engine again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loramux.bench.report import machine, summarize_run
from loramux.bench.systems import LoramuxSettings, make_prompts, run_loramux
from loramux.sim import metrics
from loramux.sim.calibrate import LINEAR_TERMS, profile_from_log
from loramux.sim.profile import Profile
from loramux.sim.run import SimSettings, simulate
from loramux.sim.workloads import Workload, from_bench
from loramux.workload import BenchRequest, WorkloadConfig, generate_ramp, generate_requests


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
    ramp: tuple[float, ...] = ()  # rates stepped through, duration / len(ramp) seconds each
    overloaded: bool = False  # offered past capacity: throughput is a prediction, not the rate


FIT = Case(
    "fit: Poisson ramp",
    0.0,
    1.0,
    32,
    (8, 16),
    1.0,
    32,
    "fcfs",
    (8, 48),
    (8, 48),
    ramp=(0.5, 1, 2, 4, 8, 16, 32, 8, 2, 1),
)
HELD_OUT = [
    Case("bursty, max_loras binds", 1.2, 3.0, 40, (8, 16, 32), 1.1, 4, "affinity", (8, 96), (8, 96)),
    Case("fair, long outputs", 1.2, 1.0, 24, (16,), 1.0, 16, "fair", (16, 64), (8, 160)),
    Case("overloaded, 100 adapters", 30.0, 1.0, 100, (8,), 1.0, 32, "fcfs", (16, 96), (8, 32),
         overloaded=True),
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
OVERLOAD_TARGET = 0.10  # throughput, on the overloaded workload


def config(case: Case, duration: float) -> WorkloadConfig:
    return WorkloadConfig(
        case.adapters, case.alpha, case.rate or 1.0, case.cv, duration, case.inputs, case.outputs, 42
    )


def requests(case: Case, duration: float) -> list[BenchRequest]:
    cfg = config(case, duration)
    return generate_ramp(cfg, case.ramp) if case.ramp else generate_requests(cfg)


def sim_workload(case: Case, duration: float) -> Workload:
    return from_bench(requests(case, duration), config(case, duration), case.ranks, case.name)


def predict(profile: Profile, case: Case, duration: float, seeds: int) -> dict[str, float]:
    """The simulator's median over `seeds` jitter seeds."""
    wl = sim_workload(case, duration)
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
        for seed in range(seeds)
    ]
    return {k: statistics.median(s[k] for s in sims) for k in KEYS}


def errors(real: dict[str, float], sim: dict[str, float]) -> dict[str, float]:
    return {k: sim[k] / real[k] - 1 if real[k] else float("nan") for k in KEYS}


def score(errs: dict[str, dict[str, float]]) -> float:
    """The held-out error as one number: the largest error over the held-out workloads and the
    targeted metrics, each in units of its target (<= 1 meets every target)."""
    worst = 0.0
    for case in HELD_OUT:
        e = errs[case.name]
        worst = max(worst, *(abs(e[k]) / t for k, t in TARGETS.items()))
        if case.overloaded:
            worst = max(worst, abs(e["req/s"]) / OVERLOAD_TARGET)
    return worst


def held_out_errors(
    log: Path, terms: Sequence[str], reals: dict[str, dict[str, float]], duration: float, seeds: int
) -> tuple[float, dict[str, dict[str, float]]]:
    profile, _ = profile_from_log(log, "heldout", terms)
    errs = {c.name: errors(reals[c.name], predict(profile, c, duration, seeds)) for c in HELD_OUT}
    return score(errs), errs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default="/tmp/loramux-fidelity")
    p.add_argument("--repeats", type=int, default=5, help="real runs and simulated seeds per workload")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals in each held-out run")
    p.add_argument("--fit-duration", type=float, default=60.0, help="seconds of arrivals in the fit's ramp")
    p.add_argument("--save-profile", default=None, help="also write the fitted profile here")
    p.add_argument("--reuse", action="store_true", help="reuse the cached real runs and fit log")
    p.add_argument("--select-terms", action="store_true", help="also run the backward elimination")
    a = p.parse_args()
    from loramux.bench.artifacts import build_random_model, write_random_adapter

    cache = Path(a.cache_dir)
    log = cache / "heldout-fit-steps.jsonl"
    saved = cache / "heldout-real.json"
    cases = [FIT, *HELD_OUT]
    if a.reuse:
        kept = json.loads(saved.read_text())
        runs, real_s = kept["runs"], kept["seconds"]
    else:
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

        def run_real(case: Case, duration: float, log: str | None = None) -> dict[str, float]:
            reqs = requests(case, duration)
            settings = LoramuxSettings(
                max_loras=case.max_loras,
                max_lora_rank=max(case.ranks),
                max_num_seqs=64,
                policy=case.policy,
                tenant_per_adapter=True,
                step_log=log,
            )
            run = run_loramux(model, adapters(case), reqs, make_prompts(reqs, 512), "online", settings)
            return real_stats(run)

        t0 = time.perf_counter()
        runs = {FIT.name: [run_real(FIT, a.fit_duration, str(log))]}
        for _ in range(a.repeats):  # interleaved: each round runs every held-out workload once
            for case in HELD_OUT:
                runs.setdefault(case.name, []).append(run_real(case, a.duration))
        real_s = time.perf_counter() - t0
        saved.write_text(json.dumps({"runs": runs, "seconds": real_s}))
    reals = {name: {k: statistics.median(r[k] for r in rs) for k in KEYS} for name, rs in runs.items()}

    profile, q = profile_from_log(log, "cpu-mid-from-log")
    if a.save_profile:
        profile.save(a.save_profile)
    rows, worst = [], {}
    for case in cases:
        sim = predict(profile, case, a.fit_duration if case is FIT else a.duration, a.repeats)
        err = errors(reals[case.name], sim)
        if case is not FIT:
            for k in KEYS:
                if k in TARGETS or (k == "req/s" and case.overloaded):
                    worst[k] = max(worst.get(k, 0.0), abs(err[k]))
        rows.append((case, reals[case.name], sim, err, len(runs[case.name])))
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
    for case, real, sim, err, n in rows:
        rate = f"{min(case.ramp):g} to {max(case.ramp):g}" if case.ramp else f"{case.rate:g}"
        lines.append(
            f"| {case.name} | {rate}, {case.cv:g} | "
            f"{case.adapters} ({'/'.join(map(str, case.ranks))}), "
            f"{case.max_loras}, {case.policy} | {n} | "
            + " | ".join(f"{real[k]:.3g} / {sim[k]:.3g} ({1 + err[k]:.2f})" for k in KEYS)
            + " |"
        )
    target = {**TARGETS, "req/s": OVERLOAD_TARGET}
    lines += [
        "",
        "Largest held-out error: "
        + ", ".join(f"{k} {v:.1%} (target {target[k]:.0%})" for k, v in worst.items())
        + " (req/s: the overloaded workload's).",
        "",
        "Each linear term left out of the fit in turn (score: the largest held-out error in units of "
        "its target; <= 1 meets every target):",
        "",
        "| fit | coefficient | score | TTFT p50 | e2e p50 | TTFT p90 | e2e p90 | overloaded req/s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, coef: str, terms: Sequence[str]) -> tuple[float, str]:
        s, errs = held_out_errors(log, terms, reals, a.duration, a.repeats)
        worst_of = {k: max(abs(errs[c.name][k]) for c in HELD_OUT) for k in TARGETS}
        over = max(abs(errs[c.name]["req/s"]) for c in HELD_OUT if c.overloaded)
        cells = " | ".join(f"{worst_of[k]:.1%}" for k in ("TTFT p50", "e2e p50", "TTFT p90", "e2e p90"))
        return s, f"| {label} | {coef} | {s:.2f} | {cells} | {over:.1%} |"

    full, text = row("all terms", "", LINEAR_TERMS)
    lines.append(text)
    for t in LINEAR_TERMS:
        _, text = row(f"without {t}", f"{getattr(profile, t):.3g}", [u for u in LINEAR_TERMS if u != t])
        lines.append(text)
    if a.select_terms:  # backward elimination: drop the term whose removal lowers the score most
        kept, best = list(LINEAR_TERMS), full
        while kept:
            trials = [(held_out_errors(log, [u for u in kept if u != t], reals, a.duration, a.repeats)[0], t)
                      for t in kept]  # fmt: skip
            s, t = min(trials)
            if s > best:
                break
            kept.remove(t)
            best = s
        kept_text = ", ".join(kept) or "no linear term"
        lines += ["", f"Backward elimination keeps {kept_text} (score {best:.2f}; all terms {full:.2f})."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
