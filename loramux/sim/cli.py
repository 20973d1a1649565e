"""`loramux simulate`: a named workload (or a trace) under one or more policies, on a profile.

Boundary: flags in, a report folder out (report.md, results.json, PNG plots).
`loramux simulate calibrate MODEL_DIR` measures a profile on this machine
(calibrate.py). Engine flags keep `loramux serve`'s names; a flag given here
overrides what the workload names.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

from loramux.config import SchedulerConfig
from loramux.sim.profile import Profile, shipped_profiles
from loramux.sim.report import write_report
from loramux.sim.run import SimResult, SimSettings, simulate
from loramux.sim.workloads import S1_RANKS, S2_RANKS, SUITES, Workload, load_trace, slora
from loramux.workload import WorkloadConfig

ENGINE_FLAGS = ("max_num_seqs", "max_num_batched_tokens", "max_loras", "max_cpu_loras", "num_pages")


def add_simulate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        default=None,
        help=f"a named workload ({', '.join(SUITES)}) or 'slora' (S-LoRA's generator with "
        "--rates, --num-adapters, ...)",
    )
    p.add_argument(
        "--trace",
        default=None,
        help="replay a CSV or JSONL trace (arrival, adapter, tenant, prompt_len, output_len, rank, path)",
    )
    p.add_argument(
        "--profile", default=None, help=f"a profile JSON file or a shipped one: {shipped_profiles()}"
    )
    p.add_argument("--policies", default="fcfs", help="comma-separated: fcfs,affinity,completion,fair")
    p.add_argument("--points", nargs="+", default=None, help="the sweep's points (default: the workload's)")
    p.add_argument(
        "--seed", type=int, default=42, help="seed of the workload's arrivals, adapters and lengths"
    )
    p.add_argument(
        "--slo", type=float, default=6.0, help="TTFT target in seconds (the metrics' and the slo policy's)"
    )
    p.add_argument(
        "--tpot-slo",
        type=float,
        default=None,
        help="a time-per-output-token target in seconds: the report's attainment then also counts "
        "it (TTFT under --slo and TPOT at or under this; vLLM's --goodput ttft:..,tpot:..)",
    )
    p.add_argument(
        "--abort-after",
        type=float,
        default=None,
        help="S-LoRA's early abort: drop a request that waited this long (W3 uses 5.5)",
    )
    p.add_argument("--no-abort", action="store_true", help="turn off the workload's early abort")
    p.add_argument("--out", default=None, help="report folder (default sim_out/<workload>)")
    p.add_argument("--list", action="store_true", help="list the named workloads and shipped profiles")
    g = p.add_argument_group("S-LoRA generator (--workload slora)")
    g.add_argument(
        "--rates", nargs="+", type=float, default=[2.0], help="request rates (req/s), one sweep point each"
    )
    g.add_argument("--num-adapters", type=int, default=200, help="distinct adapters requests pick from")
    g.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="power-law exponent of adapter popularity (larger: more skewed)",
    )
    g.add_argument(
        "--cv",
        type=float,
        default=1.0,
        help="coefficient of variation of the gaps between arrivals (1: Poisson)",
    )
    g.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per point")
    g.add_argument(
        "--input-range",
        nargs=2,
        type=int,
        default=[8, 512],
        metavar=("MIN", "MAX"),
        help="prompt lengths (tokens), uniform",
    )
    g.add_argument(
        "--output-range",
        nargs=2,
        type=int,
        default=[8, 512],
        metavar=("MIN", "MAX"),
        help="output lengths (tokens), uniform",
    )
    g.add_argument("--ranks", choices=["s1", "s2"], default="s2", help="s1: all 8; s2: [64, 32, 16, 8]")
    e = p.add_argument_group("engine (as `loramux serve`)")
    e.add_argument("--max-num-seqs", type=int, help="most requests in one step (default: the workload's)")
    e.add_argument(
        "--max-num-batched-tokens", type=int, help="most tokens in one step (default: the workload's)"
    )
    e.add_argument("--max-loras", type=int, help="device adapter slots (default: the workload's)")
    e.add_argument("--max-cpu-loras", type=int, help="adapters kept in host memory (default: the workload's)")
    e.add_argument("--num-pages", type=int, help="KV pages (default: the profile's pool)")
    e.add_argument(
        "--starvation-timeout",
        type=float,
        default=5.0,
        help="seconds after which a request held back by the adapter cap reserves the next slot",
    )
    e.add_argument(
        "--slo-wait-factor",
        type=float,
        default=SchedulerConfig.slo_wait_factor,
        help="slo policy: a request past the --slo target waits at most this many times FCFS's wait",
    )
    e.add_argument(
        "--kv-watermark",
        type=float,
        default=None,
        help="fraction of KV pages admissions leave free while requests run (default: the policy's)",
    )
    sub = p.add_subparsers(dest="sim_command")
    cal = sub.add_parser("calibrate", help="measure a profile of MODEL_DIR on this machine's executor")
    cal.add_argument("model_dir", nargs="?", default=None, help="HF model directory to measure")
    cal.add_argument(
        "--from-log",
        default=None,
        metavar="PATH",
        help="fit the profile from a step log (`loramux serve --step-log PATH`) instead of measuring",
    )
    cal.add_argument("--out", dest="profile_out", required=True, help="where to write the profile JSON")
    cal.add_argument("--name", default=None, help="the profile's name (default: the model directory's)")
    cal.add_argument(
        "--max-num-seqs", dest="cal_max_num_seqs", type=int, default=64, help="largest decode batch measured"
    )
    cal.add_argument(
        "--max-num-batched-tokens",
        dest="cal_max_num_batched_tokens",
        type=int,
        default=2048,
        help="largest step (tokens) measured",
    )
    cal.add_argument(
        "--kv-cache-memory", type=int, default=2**30, help="bytes of KV pool (the bench's 1 GiB)"
    )
    cal.add_argument("--rank", type=int, default=8, help="rank of the adapters measured")
    cal.add_argument(
        "--load",
        choices=["serving", "phases"],
        default="serving",
        help="serving: requests arrive on the wall clock at --rates, steps read from the engine's step "
        "log (what serving looks like); phases: the older synthetic batches (--requests)",
    )
    cal.add_argument(
        "--rates",
        dest="cal_rates",
        type=_positive_rates,
        default=None,
        help="serving load: comma-separated arrival rates (req/s) stepped through in equal parts of "
        "--duration; reach past your machine's capacity (default 0.5,1,2,4,8,16,8,4,2,1)",
    )
    cal.add_argument(
        "--duration",
        dest="cal_duration",
        type=float,
        default=60.0,
        help="serving load: seconds of arrivals (default 60)",
    )
    cal.add_argument("--requests", type=int, default=240, help="phases load: requests in the measured mix")
    cal.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    cal.add_argument(
        "--max-loras",
        dest="max_loras_cal",
        type=int,
        default=8,
        help="adapter slots (distinct adapters per step)",
    )
    cal.add_argument(
        "--prompt-range",
        nargs=2,
        type=int,
        default=[8, 512],
        metavar=("LO", "HI"),
        help="prompt lengths, log-uniform between LO and HI",
    )
    cal.add_argument(
        "--output-range",
        nargs=2,
        type=int,
        default=[4, 64],
        metavar=("LO", "HI"),
        help="output lengths, uniform between LO and HI",
    )


def _positive_rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(","))
    except ValueError:
        rates = ()
    if not rates or not all(r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive rates separated by commas, e.g. 1,4,16,4")
    return rates


def _settings(
    a: argparse.Namespace, engine: dict[str, object], policy: str, abort: float | None
) -> SimSettings:
    over = {k: getattr(a, k) for k in ENGINE_FLAGS if getattr(a, k) is not None}
    known = {f.name for f in fields(SimSettings)}
    cfg = {k: v for k, v in {**engine, **over}.items() if k in known}
    return SimSettings(
        policy=policy,
        abort_after=abort,
        starvation_timeout_s=a.starvation_timeout,
        ttft_slo_s=a.slo,
        slo_wait_factor=a.slo_wait_factor,
        kv_watermark=a.kv_watermark,
        seed=a.seed,
        **cfg,
    )  # type: ignore[arg-type]


def plan(a: argparse.Namespace) -> tuple[str, str, str, list[tuple[str, Workload]], float | None]:
    """(title, default profile, sweep name, [(point, workload)], abort) for the flags."""
    if a.trace:
        wl = load_trace(a.trace)
        return f"trace {Path(a.trace).name}", "cpu-mid", "trace", [(wl.name, wl)], None
    name = a.workload or "slora"
    if name == "slora":
        ranks = S1_RANKS if a.ranks == "s1" else S2_RANKS
        inp, out = tuple(a.input_range), tuple(a.output_range)

        def point(r: float) -> tuple[str, Workload]:
            cfg = WorkloadConfig(a.num_adapters, a.alpha, r, a.cv, a.duration, inp, out, a.seed)
            return f"{r:g}", slora(cfg, ranks, f"slora-rate{r:g}")

        wls = [point(float(x)) for x in (a.points or a.rates)]
        return "S-LoRA generator", "cpu-mid", "rate", wls, None
    suite = SUITES.get(name)
    if suite is None:
        raise SystemExit(
            f"unknown workload {name!r}; choose one of {['slora', *SUITES]} or give --trace FILE"
        )
    points = a.points or [str(p) for p in suite.points]
    wls = [(str(p), suite.workload(_cast(p, suite.points), a.seed)) for p in points]
    return f"{suite.name}: {suite.description}", suite.profile, suite.sweep, wls, suite.abort_after


def _cast(p: object, like: tuple[object, ...]) -> object:
    kind = type(like[0])
    try:
        return kind(p) if kind in (int, float) else str(p)
    except ValueError:
        raise SystemExit(f"point {p!r}: this workload's points are {like}") from None


def run_simulate(a: argparse.Namespace) -> Path | None:
    if a.sim_command == "calibrate":
        from loramux.sim.calibrate import calibrate

        calibrate(a)
        return None
    if a.list:
        for s in SUITES.values():
            print(f"{s.name:22s} {s.description} (profile {s.profile}; {s.sweep}: {list(s.points)})")
        print(f"{'slora':22s} S-LoRA's generator with --rates, --num-adapters, --alpha, --cv, --duration")
        print(f"profiles: {', '.join(shipped_profiles())}")
        return None
    if a.tpot_slo is not None and not a.tpot_slo > 0:
        raise SystemExit(f"--tpot-slo {a.tpot_slo:g}: a TPOT target must be positive, in seconds (e.g. 0.15)")
    title, default_profile, sweep, wls, abort = plan(a)
    profile = Profile.load(a.profile or default_profile)
    abort = None if a.no_abort else (a.abort_after if a.abort_after is not None else abort)
    policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    results: list[tuple[str, SimResult]] = []
    t0 = time.perf_counter()
    from tqdm import tqdm

    for point, wl in tqdm(wls, desc="simulate", unit="point", leave=False):
        for pol in policies:
            results.append((point, simulate(wl, profile, _settings(a, wl.engine, pol, abort))))
    first = results[0][1]
    out = Path(a.out or f"sim_out/{a.workload or (Path(a.trace).stem if a.trace else 'slora')}")
    command = "loramux simulate " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["simulate"] else ""
    s = _settings(a, wls[0][1].engine, policies[0], abort)
    intro = [
        f"Command: `{command}`" if command else "",
        f"Profile: `{profile.name}` ({profile.source}). Engine: max_num_seqs {s.max_num_seqs}, "
        f"max_num_batched_tokens {s.max_num_batched_tokens}, max_loras {s.max_loras}, KV pages "
        f"{s.num_pages or profile.num_pages} of {profile.page_size} tokens"
        + (f", early abort after {abort:g} s of waiting" if abort else "")
        + f". Seed {a.seed}. SLO: TTFT < {a.slo:g} s"
        + ("." if a.tpot_slo is None else f"; with a TPOT target, also TPOT <= {a.tpot_slo:g} s."),
        f"Simulated {sum(len(r.records) for _, r in results)} requests in "
        f"{time.perf_counter() - t0:.1f} s of wall time ({len(results)} runs; first run: "
        f"{len(first.records)} requests, {first.steps} steps, {first.wall_seconds:.1f} s).",
    ]
    fairness = all(len({r.tenant for r in res.records}) <= 32 for _, res in results) or sweep == "scenario"
    path, _ = write_report(out, title, intro, sweep, results, a.slo, fairness, a.tpot_slo)
    print(path.read_text())
    return path
