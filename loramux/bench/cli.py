"""`loramux bench`: S-LoRA's workload through loramux and transformers+PEFT, side by side, in one run.

Boundary: orchestration. It builds (or reuses) a random-weight model and
adapters in a cache folder, generates the workload, runs every system on the
same requests, and writes the report (markdown table, PNG plots) to `--out`,
and with `--write-docs` into a section of docs/benchmarks.md.

Runs, in order (a progress bar counts them):
1. the main comparison at `--main-adapters` adapters, alpha 1, for each mode:
   loramux, loramux on the base model only, PEFT mixed (at the best batch size
   of a short offline sweep), PEFT one adapter at a time;
2. loramux offline at each `--num-adapters` (throughput against adapter count);
3. loramux offline at each `--alphas` (throughput against popularity skew).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loramux.bench.report import Summary, machine, plot_series, summarize_run, table, today, write_section
from loramux.bench.systems import (
    LoramuxSettings,
    PeftHarness,
    RunResult,
    make_prompts,
    run_loramux,
    run_peft,
)
from loramux.workload import WorkloadConfig, adapter_name, generate_requests


@dataclass(frozen=True)
class Plan:
    size: str
    num_adapters: tuple[int, ...]
    main_adapters: int
    alphas: tuple[float, ...]
    rate: float
    duration: float
    input_range: tuple[int, int]
    output_range: tuple[int, int]
    peft_batch_sizes: tuple[int, ...]
    reps: int


FULL = Plan(
    "mid", (5, 100, 1000, 2000), 100, (0.1, 0.3, 0.6, 1.0), 4.0, 40.0, (8, 48), (8, 48), (4, 8, 16, 32), 5
)
QUICK = Plan("tiny", (5, 20), 20, (0.5, 1.0), 20.0, 5.0, (8, 32), (8, 32), (8, 16), 2)


def cache_root() -> Path:
    """$LORAMUX_CACHE_DIR, else $XDG_CACHE_HOME/loramux, else ~/.cache/loramux."""
    env = os.environ.get("LORAMUX_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loramux"


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny model and workload: finishes in about a minute")
    p.add_argument("--size", choices=["tiny", "mid", "1b"], help="model: tiny (2.6M), mid (91M), 1b (1.1B)")
    p.add_argument("--num-adapters", nargs="+", type=int, help="adapter counts for the scaling plot")
    p.add_argument("--main-adapters", type=int, help="adapter count of the main comparison")
    p.add_argument("--alphas", nargs="+", type=float, help="popularity skews for the alpha plot")
    p.add_argument("--rate", type=float, help="requests per second of the trace")
    p.add_argument("--duration", type=float, help="seconds of trace (requests = rate x duration)")
    p.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of arrivals")
    p.add_argument("--input-range", nargs=2, type=int, metavar=("LO", "HI"))
    p.add_argument("--output-range", nargs=2, type=int, metavar=("LO", "HI"))
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rank", type=int, default=8, help="adapter rank (on q_proj and v_proj)")
    p.add_argument("--modes", nargs="+", choices=["offline", "online"], default=["offline", "online"])
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="interleaved rounds of the loramux offline runs; tables show the median run, ratios "
        "the median of per-round ratios",
    )
    p.add_argument("--peft-batch-sizes", nargs="+", type=int)
    p.add_argument("--no-peft", action="store_true", help="skip the transformers+PEFT baselines")
    p.add_argument("--slo", type=float, default=6.0, help="TTFT target in seconds for SLO attainment")
    p.add_argument(
        "--max-loras",
        type=int,
        default=None,
        help="device adapter slots; default --max-num-seqs, so the cap never binds (here the slots cost "
        "a few MB; set it lower to see the cap at work)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=str(cache_root() / "bench"))
    p.add_argument("--out", default="bench_out", help="folder for report.md and the plots")
    p.add_argument("--write-docs", metavar="MD", help="also write the report into this markdown file")
    p.add_argument(
        "--step-log",
        metavar="PATH",
        help="write the step log (JSONL) of loramux's online run with adapters here, for "
        "`loramux simulate calibrate --from-log` (off by default)",
    )


def make_plan(a: argparse.Namespace) -> Plan:
    plan = QUICK if a.quick else FULL
    over = {
        k: v
        for k, v in {
            "size": a.size,
            "num_adapters": a.num_adapters and tuple(a.num_adapters),
            "main_adapters": a.main_adapters,
            "alphas": a.alphas and tuple(a.alphas),
            "rate": a.rate,
            "duration": a.duration,
            "input_range": a.input_range and tuple(a.input_range),
            "output_range": a.output_range and tuple(a.output_range),
            "peft_batch_sizes": a.peft_batch_sizes and tuple(a.peft_batch_sizes),
            "reps": a.reps,
        }.items()
        if v is not None
    }
    return replace(plan, **over)


def run_bench(a: argparse.Namespace) -> None:
    from tqdm import tqdm

    from loramux.bench.artifacts import build_random_model, write_random_adapter

    plan = make_plan(a)
    cache = Path(a.cache_dir)
    model_dir = build_random_model(cache / f"llama-{plan.size}", plan.size)
    n_max = max(plan.num_adapters + (plan.main_adapters,))
    adapters = [
        write_random_adapter(
            cache / f"llama-{plan.size}-r{a.rank}-qv" / adapter_name(i),
            model_dir,
            a.rank,
            ("q_proj", "v_proj"),
            seed=i,
        )
        for i in tqdm(range(n_max), desc="adapters", unit="adapter", leave=False)
    ]
    a.max_loras = a.max_loras or a.max_num_seqs
    settings = LoramuxSettings(
        max_loras=a.max_loras, max_lora_rank=a.rank, max_num_seqs=a.max_num_seqs, device=a.device
    )
    wl = WorkloadConfig(
        plan.main_adapters, 1.0, plan.rate, a.cv, plan.duration, plan.input_range, plan.output_range, a.seed
    )
    scale_points = [n for n in plan.num_adapters if n != plan.main_adapters]
    alpha_points = [x for x in plan.alphas if x != 1.0]
    # loramux offline configurations, run in interleaved rounds: (key, workload, base only)
    configs = [("adapters", wl, False), ("base", wl, True)]
    configs += [(f"n={n}", replace(wl, num_adapters=n), False) for n in scale_points]
    configs += [(f"alpha={x}", replace(wl, alpha=x), False) for x in alpha_points]
    offline, online = "offline" in a.modes, "online" in a.modes
    peft_runs = 0 if a.no_peft else 2 * len(a.modes) + len(plan.peft_batch_sizes)
    bar = tqdm(total=plan.reps * len(configs) * offline + 2 * online + peft_runs, desc="bench", unit="run")

    def loramux(cfg: WorkloadConfig, mode: str, base_only: bool = False) -> RunResult:
        reqs = generate_requests(cfg)
        prompts = make_prompts(reqs, 512)
        logged = mode == "online" and not base_only and a.step_log
        result = run_loramux(
            model_dir,
            adapters[: cfg.num_adapters],
            reqs,
            prompts,
            mode,
            replace(settings, step_log=a.step_log) if logged else settings,
            base_only,
        )
        bar.update(1)
        return result

    rounds: list[dict[str, RunResult]] = []
    for i in range(plan.reps if offline else 0):
        # Interleaved, and each round starts one config later, so neither the machine's drift nor a
        # config's place in the round favours any of them.
        order = configs[i % len(configs) :] + configs[: i % len(configs)]
        rounds.append({key: loramux(cfg, "offline", base) for key, cfg, base in order})
    main: list[RunResult] = []
    if offline:
        main += [_median_run(rounds, "adapters"), _median_run(rounds, "base")]
    if online:
        main += [loramux(wl, "online"), loramux(wl, "online", base_only=True)]
    best_batch = None
    if not a.no_peft:
        reqs = generate_requests(wl)
        prompts = make_prompts(reqs, 512)
        harness = PeftHarness(model_dir, {r.adapter: adapters[r.adapter] for r in reqs}, a.device)
        best_batch = _best_batch(harness, reqs, prompts, plan.peft_batch_sizes, a.slo, bar)
        for mode in a.modes:
            for one in (False, True):
                main.append(run_peft(harness, reqs, prompts, mode, best_batch, one_adapter=one))
                bar.update(1)
    bar.close()
    main.sort(key=lambda r: (r.mode != "offline", _ORDER.index(r.system)))
    print(_report(a, plan, wl, main, rounds, scale_points, alpha_points, best_batch))


_ORDER = [
    "loramux",
    "loramux, base only",
    "transformers+PEFT, mixed",
    "transformers+PEFT, one adapter at a time",
]


def _tps(run: RunResult) -> float:
    return sum(x.output_tokens for x in run.records) / max(run.wall, 1e-9)


def _median_run(rounds: list[dict[str, RunResult]], key: str) -> RunResult:
    """The round whose run of `key` had the median throughput: a real run, not a blend of runs."""
    runs = sorted((r[key] for r in rounds), key=_tps)
    return runs[len(runs) // 2]


def _ratio(rounds: list[dict[str, RunResult]], top: str, bottom: str) -> tuple[float, list[float]]:
    """Median over rounds of the throughput ratio top / bottom (each pair measured in one round),
    and the per-round ratios themselves, so that a reader sees the spread."""
    per_round = [_tps(r[top]) / _tps(r[bottom]) for r in rounds]
    return statistics.median(per_round), per_round


def _best_batch(
    harness: PeftHarness, reqs: list, prompts: list[list[int]], sizes: tuple[int, ...], slo: float, bar: Any
) -> int:
    """The PEFT mixed batch size with the highest offline throughput on the first requests."""
    sample = reqs[: max(sizes) * 2]
    best, best_tps = sizes[0], -1.0
    for b in sizes:
        tps = summarize_run(
            run_peft(harness, sample, prompts, "offline", b, one_adapter=False), slo
        ).tokens_per_s
        bar.update(1)
        if tps > best_tps:
            best, best_tps = b, tps
    return best


def _load_text(s: Summary) -> str:
    """Where the run's adapter-loading time went: disk -> host on the reader thread, host -> slot
    in the step, and steps spent waiting for a read."""
    if s.load_seconds is None:
        return "-"
    return " / ".join(f"{x:.2f}" for x in s.load_seconds)


def _report(
    a: argparse.Namespace,
    plan: Plan,
    wl: WorkloadConfig,
    main: list[RunResult],
    rounds: list[dict[str, RunResult]],
    scale_points: list[int],
    alpha_points: list[float],
    best_batch: int | None,
) -> str:
    import torch

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if a.device != "cpu" and torch.cuda.is_available() else "cpu"
    key = f"{plan.size}-{device}{'-quick' if a.quick else ''}"
    sums = [summarize_run(r, a.slo) for r in main]
    scale = [(n, k) for n, k in [(plan.main_adapters, "adapters"), *((n, f"n={n}") for n in scale_points)]]
    alpha = [(x, k) for x, k in [(1.0, "adapters"), *((x, f"alpha={x}") for x in alpha_points)]]
    scale_s = sorted((n, summarize_run(_median_run(rounds, k), a.slo)) for n, k in scale) if rounds else []
    alpha_s = sorted((x, summarize_run(_median_run(rounds, k), a.slo)) for x, k in alpha) if rounds else []
    series = {"loramux": [(float(n), s.tokens_per_s) for n, s in scale_s]}
    base = next((s for s in sums if s.system == "loramux, base only" and s.mode == "offline"), None)
    if base is not None:
        series["loramux, base only"] = [(float(n), base.tokens_per_s) for n, _ in scale_s]
    for s in sums:
        if s.mode == "offline" and s.system.startswith("transformers"):
            series[s.system] = [(float(plan.main_adapters), s.tokens_per_s)]
    adapters_png = plot_series(
        out / "throughput_vs_adapters.png",
        f"Throughput against adapter count ({key})",
        "number of adapters (log scale)",
        series,
        logx=True,
    )
    alpha_png = plot_series(
        out / "throughput_vs_alpha.png",
        f"Throughput against popularity alpha ({key})",
        "alpha (1 = uniform; smaller = more skewed)",
        {"loramux": [(x, s.tokens_per_s) for x, s in alpha_s]},
    )
    ratios = {}
    if rounds:
        ratios["base"] = _ratio(rounds, "adapters", "base")
        lo, hi = min(scale), max(scale)
        if lo != hi:
            ratios["scale"] = _ratio(rounds, hi[1], lo[1])
    body = _markdown(
        a, plan, wl, sums, scale_s, alpha_s, ratios, best_batch, key, adapters_png.name, alpha_png.name
    )
    (out / "report.md").write_text(body)
    if a.write_docs:
        doc = Path(a.write_docs)
        figs = doc.parent / "bench" / key
        figs.mkdir(parents=True, exist_ok=True)
        for png in (adapters_png, alpha_png):
            shutil.copy(png, figs / png.name)
        rel = figs.relative_to(doc.parent)
        write_section(
            doc,
            key,
            body.replace(f"]({adapters_png.name})", f"]({rel / adapters_png.name})").replace(
                f"]({alpha_png.name})", f"]({rel / alpha_png.name})"
            ),
        )
    return body


def _markdown(
    a: argparse.Namespace,
    plan: Plan,
    wl: WorkloadConfig,
    sums: list[Summary],
    scale: list[tuple[int, Summary]],
    alpha: list[tuple[float, Summary]],
    ratios: dict[str, tuple[float, list[float]]],
    best_batch: int | None,
    key: str,
    adapters_png: str,
    alpha_png: str,
) -> str:
    def find(system: str, mode: str = "offline") -> Summary | None:
        return next((s for s in sums if s.system == system and s.mode == mode), None)

    lm = find("loramux")
    mixed, single = find("transformers+PEFT, mixed"), find("transformers+PEFT, one adapter at a time")
    command = shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else ""
    lines = [
        f"## loramux bench: {key}",
        "",
        f"Command: `{f'loramux bench {command}'.strip()}`",
        "",
        f"Machine: {machine()}. Date: {today()}.",
        "",
        f"Workload: S-LoRA's synthetic trace (papers.md 2.1), seed {wl.seed}: {wl.num_requests} requests, "
        f"rate {wl.req_rate}/s, cv {wl.cv}, input lengths U{list(wl.input_range)}, output lengths "
        f"U{list(wl.output_range)} (half-open; scaled down from [8, 512) for this machine), adapters of rank "
        f"{a.rank} on q_proj and v_proj, random weights. loramux: max_loras={a.max_loras}, "
        f"max_num_seqs={a.max_num_seqs}. SLO: TTFT < {a.slo} s. The loramux offline runs were repeated "
        f"in {plan.reps} interleaved rounds, each starting one configuration later: tables show the median "
        f"run, and ratios between loramux runs are the median of the per-round ratios (this shared "
        f"machine's speed drifts by tens of percent).",
        "",
        f"### Main comparison: {plan.main_adapters} adapters, alpha 1",
        "",
        table(sums),
        "",
    ]
    if best_batch is not None:
        lines += [
            f"transformers+PEFT ran static batches of {best_batch} (the best of "
            f"{list(plan.peft_batch_sizes)} in an offline sweep on the first requests).",
            "",
        ]
    lines += ["Headline ratios (offline, generated tokens/s):", ""]
    if lm and mixed:
        lines.append(
            f"- loramux / transformers+PEFT mixed, {plan.main_adapters} adapters: "
            f"**{lm.tokens_per_s / mixed.tokens_per_s:.2f}x** (target >= 10x)"
        )
    if lm and single:
        lines.append(
            f"- loramux / transformers+PEFT one adapter at a time, {plan.main_adapters} adapters: "
            f"**{lm.tokens_per_s / single.tokens_per_s:.2f}x**"
        )

    def rounds_text(per_round: list[float]) -> str:
        return f" (rounds: {', '.join(f'{x:.3f}' for x in per_round)})" if len(per_round) > 1 else ""

    if "base" in ratios:
        med, per_round = ratios["base"]
        lines.append(
            f"- loramux with adapters / loramux base only: **{med:.3f}** (target >= 0.90)"
            + rounds_text(per_round)
        )
    if "scale" in ratios:
        lo, hi = min(n for n, _ in scale), max(n for n, _ in scale)
        med, per_round = ratios["scale"]
        lines.append(
            f"- {hi} adapters / {lo} adapters: **{med:.3f}** (target >= 0.95)" + rounds_text(per_round)
        )
    lines += [
        "",
        "### Throughput against the number of adapters (loramux, offline, median run)",
        "",
        "| adapters | tokens/s | requests/s | adapter loads | load seconds: read / copy / wait |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {s.tokens_per_s:.1f} | {s.requests_per_s:.2f} | {s.adapter_loads} | {_load_text(s)} |"
        for n, s in scale
    ]
    lines += [
        "",
        f"![throughput against adapters]({adapters_png})",
        "",
        "### Throughput against alpha (loramux, offline, median run)",
        "",
        "| alpha | tokens/s | requests/s | adapter loads | load seconds: read / copy / wait |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {x} | {s.tokens_per_s:.1f} | {s.requests_per_s:.2f} | {s.adapter_loads} | {_load_text(s)} |"
        for x, s in alpha
    ]
    lines += ["", f"![throughput against alpha]({alpha_png})", ""]
    return "\n".join(lines)
