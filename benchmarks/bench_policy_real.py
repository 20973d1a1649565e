"""Issue 26 on the real engine: policies side by side where attainment falls between 0.5 and 0.9.

    python benchmarks/bench_policy_real.py [--cache-dir DIR] [--rounds 3] [--rate 4] [--slo 2]
                                           [--duration 60] [--policies fcfs,fair,slo]
                                           [--kv-cache-memory BYTES] [--slo-wait-factor 2.3]
                                           [--sim-seeds 3] [--tpot-slo S]

Not a test. The bench's mid model (91M parameters, random weights, fp32) on this machine's CPU
with 32 adapters (ranks 8 and 16 on q_proj and v_proj, built once in --cache-dir), each adapter
its own tenant; S-LoRA's generator at --rate (alpha 1, cv 1, prompts and outputs U[8, 128),
seed 42) for --duration seconds, served online in real time by `LLM`'s engine. --rounds rounds,
each running every policy once (interleaved, so the machine's drift spreads over all of them).
Prints, per policy, the real runs' SLO attainment (TTFT < --slo), p99 TTFT, p99 time per output
token (vLLM's TPOT; with --tpot-slo, attainment that also asks TPOT <= S) and req/s (median
and each run) beside the simulator's prediction for the same workload (median over jitter seeds
0 to --sim-seeds - 1, 3 by default; where two tails are close, more seeds are needed to rank
them) on a profile fitted from the step log of the first round's first run (`profile_from_log`,
what `loramux simulate calibrate --from-log` does: this machine, this workload), and each side's
ranking. --slo-wait-factor is slo's, in the real runs and the prediction alike (the other
policies do not read it).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from loramux.bench.report import machine
from loramux.bench.systems import LoramuxSettings, make_prompts, run_loramux
from loramux.config import SchedulerConfig
from loramux.sim import metrics as m
from loramux.sim.calibrate import profile_from_log
from loramux.sim.run import SimSettings, simulate
from loramux.sim.workloads import from_bench
from loramux.workload import WorkloadConfig, generate_requests

RANKS = (8, 16)
ADAPTERS = 32
ENGINE = {"max_loras": 32, "max_lora_rank": 16, "max_num_seqs": 64, "max_num_batched_tokens": 2048}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default="/tmp/loramux-policy")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=4.0)
    p.add_argument(
        "--slo", type=float, default=2.0, help="TTFT target (s): the metric's and the slo policy's"
    )
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--policies", default="fcfs,fair,slo")
    p.add_argument(
        "--kv-cache-memory",
        type=int,
        default=LoramuxSettings.kv_cache_memory,
        help="KV pool bytes (default 1 GiB, which this workload never fills; smaller makes KV memory bind)",
    )
    p.add_argument(
        "--slo-wait-factor",
        type=float,
        default=SchedulerConfig.slo_wait_factor,
        help="slo's --slo-wait-factor, in the real runs and the prediction alike",
    )
    p.add_argument("--sim-seeds", type=int, default=3, help="jitter seeds the prediction's median is over")
    p.add_argument(
        "--tpot-slo",
        type=float,
        default=None,
        help="seconds: also report attainment that asks TPOT <= this (DistServe's; vLLM's --goodput)",
    )
    a = p.parse_args()
    from loramux.bench.artifacts import build_random_model, write_random_adapter

    policies = [x for x in a.policies.split(",") if x]
    cfg = WorkloadConfig(ADAPTERS, 1.0, a.rate, 1.0, a.duration, (8, 128), (8, 128), 42)
    reqs = generate_requests(cfg)
    cache = Path(a.cache_dir)
    model = build_random_model(cache / "llama-mid", "mid")
    adapters = [
        write_random_adapter(cache / f"a{i}", model, RANKS[i % 2], ("q_proj", "v_proj"), seed=i)
        for i in range(ADAPTERS)
    ]
    prompts = make_prompts(reqs, 512)
    real: dict[str, list[tuple[float, ...]]] = {pol: [] for pol in policies}
    preempted: dict[str, list[int]] = {pol: [] for pol in policies}
    t0 = time.perf_counter()
    log = cache / "policy-real-steps.jsonl"
    log.unlink(missing_ok=True)
    for k in range(a.rounds):
        for j, pol in enumerate(policies):
            settings = LoramuxSettings(
                **ENGINE,
                max_cpu_loras=256,
                kv_cache_memory=a.kv_cache_memory,
                policy=pol,
                ttft_slo_s=a.slo,
                slo_wait_factor=a.slo_wait_factor,
                tenant_per_adapter=True,
                step_log=str(log) if k == j == 0 else None,
            )
            run = run_loramux(model, adapters, reqs, prompts, "online", settings)
            done = sum(r.finish is not None for r in run.records)
            real[pol].append((*_latency(run.records, a.slo, a.tpot_slo), done / max(run.wall, 1e-9)))
            preempted[pol].append(run.notes["preemptions"])
    real_s = time.perf_counter() - t0
    wl = from_bench(reqs, cfg, RANKS, "policy-real")
    prof, _ = profile_from_log(log, "cpu-mid-policy-real")
    sim: dict[str, tuple[float, ...]] = {}
    sim_preempted: dict[str, float] = {}
    for pol in policies:
        runs, pre = [], []
        for seed in range(a.sim_seeds):
            res = simulate(
                wl,
                prof,
                SimSettings(
                    policy=pol,
                    ttft_slo_s=a.slo,
                    slo_wait_factor=a.slo_wait_factor,
                    seed=seed,
                    max_cpu_loras=256,
                    **ENGINE,
                ),
            )
            runs.append((*_latency(res.records, a.slo, a.tpot_slo), m.throughput(res.records)))
            pre.append(res.preemptions)
        sim_preempted[pol] = statistics.median(pre)
        sim[pol] = tuple(statistics.median(r[i] for r in runs) for i in range(5))
    med = {pol: tuple(statistics.median(r[i] for r in rs) for i in range(5)) for pol, rs in real.items()}
    print(
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. {len(reqs)} requests, rate {a.rate:g}, "
        f"{a.duration:g} s, SLO TTFT < {a.slo:g} s, slo's wait factor {a.slo_wait_factor:g}; "
        f"{a.rounds} rounds of real runs took {real_s:.0f} s.\n"
    )
    both = (
        "" if a.tpot_slo is None else f" | attainment with TPOT <= {1000 * a.tpot_slo:g} ms real (runs) | sim"
    )
    print(
        "| policy | attainment real median (runs) | sim "
        "| p99 TTFT s real median (runs) | sim | p99 TPOT ms real median (runs) | sim"
        f"{both} | req/s real | sim | preemptions real median | sim |"
    )
    print("|---|" + "---|" * (12 if a.tpot_slo is not None else 10))
    for pol in policies:
        runs, me, pred = real[pol], med[pol], sim[pol]
        cells = [
            f"{me[0]:.3f} ({', '.join(f'{r[0]:.3f}' for r in runs)}) | {pred[0]:.3f}",
            f"{me[1]:.2f} ({', '.join(f'{r[1]:.2f}' for r in runs)}) | {pred[1]:.2f}",
            f"{1000 * me[2]:.0f} ({', '.join(f'{1000 * r[2]:.0f}' for r in runs)}) | {1000 * pred[2]:.0f}",
        ]
        if a.tpot_slo is not None:
            cells.append(f"{me[3]:.3f} ({', '.join(f'{r[3]:.3f}' for r in runs)}) | {pred[3]:.3f}")
        cells += [
            f"{me[4]:.2f} | {pred[4]:.2f}",
            f"{statistics.median(preempted[pol]):g} | {sim_preempted[pol]:g}",
        ]
        print(f"| {pol} | " + " | ".join(cells) + " |")
    for label, i, best_high in (("attainment", 0, True), ("p99 TTFT", 1, False), ("p99 TPOT", 2, False)):
        order_real = sorted(policies, key=lambda x: med[x][i], reverse=best_high)
        order_sim = sorted(policies, key=lambda x: sim[x][i], reverse=best_high)
        print(f"\n{label} ranking, real: {' > '.join(order_real)}; simulated: {' > '.join(order_sim)}")


def _latency(records: list, slo: float, tpot_slo: float | None) -> tuple[float, float, float, float]:
    """Attainment, p99 TTFT, p99 TPOT, and attainment with the TPOT target too (nan without one)."""
    ttft = [r.first_token - r.arrival for r in records if r.first_token is not None]
    tpot = [d for r in records if (d := m.tpot(r)) is not None]
    return (
        m.attainment(records, slo),
        m.stats(ttft).p99,
        m.stats(tpot).p99,
        math.nan if tpot_slo is None else m.attainment(records, slo, tpot_slo),
    )


if __name__ == "__main__":
    main()
