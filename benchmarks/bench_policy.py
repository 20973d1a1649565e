"""Issue 26's acceptance sweep: a policy against the best of fcfs / affinity / fair at every point.

    python benchmarks/bench_policy.py [--policy slo] [--wait-factors 1,1.5,2.3,3,4] [--jobs 2] [--bound]
                                      [--policy-wait-factors 1,2.3 [--plot map.png]]
                                      [--ratio-seeds 42,1,2,3,4,5] [--map-seeds 1,2 --policy-wait-factors 2,3]

Not a test. Simulates every named workload (W1-W5, papers.md section 3; W1 and W3 with and
without early abort, W1 at W3's abort time as it has none of its own) under fcfs, affinity,
fair and --policy with the suite's own engine settings and seed 42 (`loramux simulate`'s
defaults), then prints one Markdown table per check with the best baseline, the policy's value,
their ratio and whether the issue's bound holds:
- W1 every rate and W3 every cv, with and without abort: attainment >= the best, throughput >= 0.98x
  the best, p99 TTFT of served requests <= 1.1x the lowest;
- W3 with abort: attainment above S-LoRA's early abort (papers.md: .858 .817 .743 .690 .637);
- W4: max and mean service difference <= 1.1x fair's, tokens/s >= 0.98x fcfs's;
- W2, W5: throughput >= 0.98x the best, adapter loads <= fcfs's;
- W1 at rate 2: no adapter's p99 wait (to first scheduled) above 3x the median adapter's.
With --wait-factors, the trade-off curve of `--slo-wait-factor` on W1 at rates 2 and 2.5.
With --policy-wait-factors, every check above once per `--slo-wait-factor` of --policy (the
baselines, which do not read it, simulated once), then a table of the checks held and failed
at each: the whole sweep's side of a wait factor chosen for another point; and a map of the 18
W1/W3 points (rows) by wait factor (columns) that says which of each point's three checks fail
there and at which factors the point holds all three. With --plot PATH as well, that map as a
figure: per point, the curve over the wait factors of its p99 TTFT / the lowest baseline's (x)
against its attainment less the best baseline's (y), with the region where both hold shaded.
With --map-seeds as well, only that map (W1/W3 alone), once per seed, and per seed the most
points any one factor holds, and the points no factor holds.
--kv-watermark and --baselines-kv-watermark set the KV watermark (SchedulerConfig.kv_watermark) of
--policy and of the baselines: what the order is worth with the same watermark for all.
With --ratio-seeds, only the last check (W1 at rate 2, adapters' p99 waits) on each of those
seeds for every policy: the max and median adapter p99 wait, their ratio, and attainment.
With --tpot-slo S, every attainment above (every policy's) also asks the request's TPOT to be at
most S seconds (DistServe's SLO attainment); S-LoRA's published numbers stay TTFT alone.
With --bound, the least number of misses any order could reach on W1 at rate 2 while keeping p99
TTFT within 1.1x the lowest, from each policy's own first-token trajectory (see `miss_bound`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from loramux.bench.report import machine
from loramux.sim import metrics as m
from loramux.sim.profile import Profile
from loramux.sim.run import Record, SimResult, SimSettings, simulate
from loramux.sim.workloads import SUITES

BASELINES = ("fcfs", "affinity", "fair")
SLORA_EARLY_ABORT = {1.0: 0.858, 2.0: 0.817, 4.0: 0.743, 6.0: 0.690, 8.0: 0.637}  # papers.md, W3
SEED = 42
ABORT_AFTER_S = SUITES["slora-bursty-abort"].abort_after  # W1 has none of its own: W3's, for W1 with abort
LATENCY_SUITES = {"slora-a10g-sweep": "W1 rate", "slora-bursty-abort": "W3 cv"}  # the W1/W3 points
CHECKS = ("att", "req/s", "p99")  # short names of latency_checks' three, in its order


def latency_points() -> list[tuple[str, object, bool]]:
    """The issue's 18 W1/W3 points: every rate and every cv, with and without abort."""
    return [(s, pt, ab) for s in LATENCY_SUITES for pt in SUITES[s].points for ab in (False, True)]


def point_name(suite: str, point: object, abort: bool) -> str:
    """E.g. "W3 cv 4 abort"."""
    return f"{LATENCY_SUITES[suite]} {point:g}" + (" abort" if abort else "")  # type: ignore[str-format]


@dataclass(frozen=True)
class Job:
    suite: str
    point: object
    policy: str
    abort: bool = False
    wait_factor: float | None = None  # a point of the W1 trade-off curve
    kv_watermark: float | None = None  # None: the policy's own
    slo_wait_factor: float | None = None  # the policy's --slo-wait-factor in the checks; None: default
    seed: int | None = None  # the workload's and the simulation's; None: SEED
    tpot_slo: float | None = None  # attainment also asks TPOT <= this (s); None: TTFT alone


@dataclass(frozen=True)
class Result:
    job: Job
    attainment: float
    throughput: float
    p99: float  # TTFT of served requests
    loads: int
    max_diff: float = 0.0
    avg_diff: float = 0.0
    tokens_per_s: float = 0.0
    adapter_wait_ratio: float = 0.0  # max over adapters of p99 wait / median adapter's
    adapter_wait_max: float = 0.0  # the largest adapter p99 wait, s
    adapter_wait_median: float = 0.0  # the median adapter's p99 wait, s


def _simulate(job: Job) -> SimResult:
    suite = SUITES[job.suite]
    seed = SEED if job.seed is None else job.seed
    wl = suite.workload(job.point, seed)
    s = SimSettings(policy=job.policy, seed=seed, **wl.engine)  # type: ignore[arg-type]
    s = replace(s, abort_after=(suite.abort_after or ABORT_AFTER_S) if job.abort else None)
    factor = job.wait_factor if job.wait_factor is not None else job.slo_wait_factor
    if factor is not None:
        s = replace(s, slo_wait_factor=factor)
    if job.kv_watermark is not None:
        s = replace(s, kv_watermark=job.kv_watermark)
    return simulate(wl, Profile.load(suite.profile), s)


def _records(job: Job) -> list[Record]:
    return _simulate(job).records


def run(job: Job) -> Result:
    res = _simulate(job)
    recs = res.records
    att = m.attainment(recs, tpot_slo=job.tpot_slo)
    out = Result(job, att, m.throughput(recs), m.ttft_stats(recs).p99, res.adapter_loads)
    if job.suite == "vtc-fairness":
        f = m.fairness(recs, float(int(max(r.arrival for r in recs))))
        out = replace(out, max_diff=f.max_diff, avg_diff=f.avg_diff, tokens_per_s=f.tokens_per_s)
    top, median = adapter_waits(recs)
    return replace(
        out, adapter_wait_ratio=top / max(median, 1e-9), adapter_wait_max=top, adapter_wait_median=median
    )


def adapter_waits(recs: list[Record]) -> tuple[float, float]:
    """The largest and the median of the adapters' p99 waits (arrival to first scheduled, s)."""
    waits: dict[int | None, list[float]] = defaultdict(list)
    for r in recs:
        if r.first_scheduled is not None:
            waits[r.adapter].append(r.first_scheduled - r.arrival)
    p99s = [float(np.percentile(w, 99)) for w in waits.values()]
    return (max(p99s), statistics.median(p99s)) if p99s else (0.0, 0.0)


def excess_integral(recs: list[Record], slo: float = m.SLO_S, dt: float = 0.05) -> float:
    """The integral over time of E+(t) = max(0, waiting(t) - arrivals in (t - slo, t]), in request-seconds.

    waiting(t) counts the requests that have arrived and have no first token yet. At least E(t)
    of them arrived more than `slo` ago, whatever the order they are served in, as long as the
    first tokens come at the same times (same throughput trajectory): waiting-and-old = waiting -
    waiting-and-fresh >= waiting - all fresh. So the misses' total time past the target is at
    least this integral."""
    arr = np.sort(np.array([r.arrival for r in recs]))
    firsts = np.sort(np.array([r.first_token for r in recs if r.first_token is not None]))
    end = max(float(arr[-1]), float(firsts[-1]) if len(firsts) else 0.0)
    t = np.arange(0.0, end + dt, dt)
    waiting = np.searchsorted(arr, t, "right") - np.searchsorted(firsts, t, "right")
    fresh = np.searchsorted(arr, t, "right") - np.searchsorted(arr, t - slo, "right")
    return float(np.clip(waiting - fresh, 0, None).sum() * dt)


def miss_bound(
    excess: float, tmax: float, tail: int = 0, tail_max: float = 0.0, slo: float = m.SLO_S
) -> float:
    """The least misses that absorb `excess` request-seconds past the target when each may wait
    at most `tmax` (the p99 bound), except `tail` requests (p99's 1 %) that may wait `tail_max`."""
    if excess <= tail * (tail_max - slo):
        return float(min(tail, excess / max(tail_max - slo, 1e-9)))
    return tail + (excess - tail * (tail_max - slo)) / (tmax - slo)


def bound_report(policy: str, jobs_: int) -> list[str]:
    """W1 at rate 2: the queueing bound on misses against what the best attainment allows."""
    pols = (*BASELINES, policy)
    todo = [Job("slora-a10g-sweep", 2.0, pol) for pol in pols]
    with ProcessPoolExecutor(jobs_) as pool:
        recs = list(pool.map(_records, todo))
    res = {pol: (m.attainment(r), m.ttft_stats(r).p99, r) for pol, r in zip(pols, recs, strict=True)}
    best_att = max(res[b][0] for b in BASELINES)
    tmax = 1.1 * min(res[b][1] for b in BASELINES)
    n = len(recs[0])
    allowed = (1 - best_att) * n
    tail = int(0.01 * n)
    lines = [
        "",
        f"### W1 at rate 2: least misses with p99 TTFT <= {tmax:.2f} s, against the {allowed:.0f} "
        f"that attainment {best_att:.3f} allows ({n} requests)",
        "",
        _row(["trajectory of", "misses", "excess request-s", "least misses", f"least, {tail} parked <= 30s"]),
        _row(["---"] * 5),
    ]
    for pol in pols:
        att, _, r = res[pol]
        e = excess_integral(r)
        lines.append(
            _row(
                [
                    pol,
                    round((1 - att) * n),
                    f"{e:.0f}",
                    f"{miss_bound(e, tmax):.0f}",
                    f"{miss_bound(e, tmax, tail, 30.0):.0f}",
                ]
            )
        )
    return lines


def ratio_report(policy: str, seeds: list[int], jobs_: int) -> list[str]:
    """W1 at rate 2 on each seed: every policy's max / median adapter p99 wait and attainment."""
    pols = (*BASELINES, policy)
    todo = [Job("slora-a10g-sweep", 2.0, pol, seed=sd) for sd in seeds for pol in pols]
    with ProcessPoolExecutor(jobs_) as pool:
        results = list(pool.map(run, todo))
    lines = [
        "",
        "### W1 at rate 2 on each seed: max / median adapter p99 wait (ratio <= 3 holds)",
        "",
        _row(["seed", "policy", "attainment", "max adapter p99 wait s", "median s", "ratio", "ok"]),
        _row(["---"] * 7),
    ]
    for r in results:
        lines.append(
            _row(
                [
                    r.job.seed,
                    r.job.policy,
                    f"{r.attainment:.3f}",
                    f"{r.adapter_wait_max:.2f}",
                    f"{r.adapter_wait_median:.2f}",
                    f"{r.adapter_wait_ratio:.2f}",
                    _check(r.adapter_wait_ratio <= 3.0),
                ]
            )
        )
    held = {pol: sum(r.adapter_wait_ratio <= 3.0 for r in results if r.job.policy == pol) for pol in pols}
    lines += ["", "Seeds where it holds: " + ", ".join(f"{p} {held[p]} of {len(seeds)}" for p in pols) + "."]
    return lines


def map_report(
    policy: str, seeds: list[int], factors: list[float], tpot_slo: float | None, jobs_: int
) -> list[str]:
    """Simulates each seed's W1/W3 points under the baselines and --policy at each wait factor,
    then `seed_maps` of the results."""
    todo = [
        Job(suite, point, pol, abort, slo_wait_factor=f, seed=sd, tpot_slo=tpot_slo)
        for sd in seeds
        for suite, point, abort in latency_points()
        for pol, f in [*((b, None) for b in BASELINES), *((policy, f) for f in factors)]
    ]
    with ProcessPoolExecutor(jobs_) as pool:
        results = list(pool.map(run, todo))
    return [f"{len(todo)} simulations.", *seed_maps(results, policy, seeds)]


def seed_maps(results: list[Result], policy: str, seeds: list[int]) -> list[str]:
    """The point-by-point map of --policy's wait factors on each seed, then a line per seed: the
    most points one factor holds (and at which factors), and the points no factor holds."""
    lines: list[str] = []
    summary = [
        _row(["seed", "most points one factor holds", "at", "points no factor holds"]),
        _row(["---"] * 4),
    ]
    for sd in seeds:
        fps = factor_points([r for r in results if r.job.seed == sd], policy)
        lines += ["", f"## Seed {sd}", *factor_map(fps, policy)]
        held, good = points_held(fps), holds_at(fps)
        most = max(held.values())
        at = ", ".join(f"{f:g}" for f, h in held.items() if h == most)
        never = "; ".join(n for n, fs in good.items() if not fs) or "none"
        summary.append(_row([sd, f"{most} / {len(good)}", at, never]))
    return [*lines, "", "## Per seed", "", *summary]


def jobs(policy: str, wait_factors: list[float]) -> list[Job]:
    pols = (*BASELINES, policy)
    js = [
        Job(suite, p, pol, abort)
        for suite in ("slora-a10g-sweep", "slora-bursty-abort")
        for p in SUITES[suite].points
        for abort in (False, True)
        for pol in pols
    ]
    js += [
        Job("vtc-fairness", sc, pol)
        for sc in SUITES["vtc-fairness"].points
        for pol in ("fcfs", "fair", policy)
    ]
    for name in ("slora-a100-scale", "punica-popularity"):
        js += [Job(name, p, pol) for p in SUITES[name].points for pol in pols]
    js += [Job("slora-a10g-sweep", r, policy, wait_factor=k) for r in (2.0, 2.5) for k in wait_factors]
    return js


def latency_checks(base: list, me: object) -> tuple[bool, bool, bool]:
    """The issue's W1/W3 bounds for `me` against the baselines at one point: attainment >= the
    best, throughput >= 0.98x the best, p99 TTFT <= 1.1x the lowest (anything with those fields)."""
    return (
        me.attainment >= max(r.attainment for r in base),  # type: ignore[attr-defined]
        me.throughput >= 0.98 * max(r.throughput for r in base),  # type: ignore[attr-defined]
        me.p99 <= 1.1 * min(r.p99 for r in base),  # type: ignore[attr-defined]
    )


@dataclass(frozen=True)
class FactorPoint:
    """One W1/W3 point under --policy at one wait factor, against the baselines at that point."""

    point: str  # e.g. "W3 cv 4 abort"
    factor: float
    attainment_gap: float  # the policy's attainment less the best baseline's: >= 0 holds
    p99_ratio: float  # the policy's p99 TTFT over the lowest baseline's: <= 1.1 holds
    held: tuple[bool, bool, bool]  # latency_checks: attainment, throughput, p99 TTFT

    @property
    def failing(self) -> str:
        return " ".join(c for c, ok in zip(CHECKS, self.held, strict=True) if not ok) or "ok"


def factor_points(results: list[Result], policy: str) -> list[FactorPoint]:
    """Every W1/W3 point in `results` at every wait factor --policy was run at (its
    `slo_wait_factor`), point by point in the suites' order, against the baselines there."""
    by: dict[tuple[str, object, bool], dict[object, Result]] = defaultdict(dict)
    for r in results:
        j = r.job
        if j.suite in LATENCY_SUITES and j.wait_factor is None:
            by[(j.suite, j.point, j.abort)][j.slo_wait_factor if j.policy == policy else j.policy] = r
    out = []
    for key in latency_points():
        rs = by.get(key)
        if not rs:
            continue
        base = [rs[b] for b in BASELINES]
        best = max(r.attainment for r in base)
        low = min(r.p99 for r in base)
        for f in sorted(k for k in rs if k not in BASELINES):  # type: ignore[type-var]
            me = rs[f]
            gap, ratio = me.attainment - best, me.p99 / max(low, 1e-9)
            out.append(FactorPoint(point_name(*key), float(f), gap, ratio, latency_checks(base, me)))  # type: ignore[arg-type]
    return out


def holds_at(fps: list[FactorPoint]) -> dict[str, list[float]]:
    """Per point, in order, the wait factors at which it holds all three checks."""
    out: dict[str, list[float]] = {fp.point: [] for fp in fps}
    for fp in sorted(fps, key=lambda fp: fp.factor):
        if all(fp.held):
            out[fp.point].append(fp.factor)
    return out


def points_held(fps: list[FactorPoint]) -> dict[float, int]:
    """Per wait factor, in order, how many points hold all three checks there."""
    return {f: sum(all(fp.held) for fp in fps if fp.factor == f) for f in sorted({fp.factor for fp in fps})}


def factor_map(fps: list[FactorPoint], policy: str) -> list[str]:
    """The map: a row per point, a column per wait factor, the checks failing in each cell, the
    factors where the point holds all three, and the points held per factor."""
    held, good = points_held(fps), holds_at(fps)
    at = {(fp.point, fp.factor): fp for fp in fps}
    lines = [
        "",
        f"### {policy}'s wait factor, point by point: the W1/W3 checks that fail "
        "(att: attainment >= the best, req/s >= 0.98x the best, p99 TTFT <= 1.1x the lowest)",
        "",
        _row(["point", *[f"{f:g}" for f in held], "holds all three at"]),
        _row(["---"] * (len(held) + 2)),
    ]
    for n, fs in good.items():
        cells = [at[(n, f)].failing for f in held]
        lines.append(_row([n, *cells, ", ".join(f"{f:g}" for f in fs) or "**none**"]))
    lines.append(_row(["points holding all three", *[f"{h} / {len(good)}" for h in held.values()], ""]))
    return lines


def plot_factor_points(fps: list[FactorPoint], path: Path, policy: str) -> None:
    """The map as curves: one per point over the wait factors, p99 ratio against attainment gap,
    the region where both checks hold shaded; a hollow marker where a check fails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, abort in zip(axes, (False, True), strict=True):
        names = list(dict.fromkeys(fp.point for fp in fps if fp.point.endswith(" abort") == abort))
        for i, n in enumerate(names):
            curve = [fp for fp in fps if fp.point == n]
            color = plt.cm.tab10(i % 10)
            xs, ys = [fp.p99_ratio for fp in curve], [fp.attainment_gap for fp in curve]
            ax.plot(xs, ys, color=color, lw=1, label=n)
            for fp, x, y in zip(curve, xs, ys, strict=True):
                ax.scatter(x, y, s=28, color=color, facecolors=color if all(fp.held) else "none", zorder=3)
            for fp in (curve[0], curve[-1]):
                ax.annotate(
                    f"{fp.factor:g}",
                    (fp.p99_ratio, fp.attainment_gap),
                    fontsize=7,
                    color=color,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        x0, x1 = ax.get_xlim()
        x0, x1 = min(x0, 0.95), max(x1, 1.15)  # the bound at 1.1 in view on both panels
        y0, y1 = ax.get_ylim()
        ax.fill_between([x0, 1.1], 0, y1, color="green", alpha=0.08, lw=0)
        ax.axvline(1.1, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel(f"{policy}'s p99 TTFT / the lowest baseline's (holds <= 1.1)")
        ax.set_title("with early abort" if abort else "without abort", fontsize=10)
        ax.grid(alpha=0.3)
        if names:
            ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel(f"{policy}'s attainment - the best baseline's (holds >= 0)")
    fig.suptitle(
        f"{policy} over --slo-wait-factor (numbers: the first and last factor; hollow: a check fails there; "
        "shaded: attainment and p99 both hold)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _check(ok: bool) -> str:
    return "yes" if ok else "**no**"


def report(results: list[Result], policy: str) -> tuple[list[str], int, list[str]]:
    """The tables, the number of checks that hold, and a short name for each one that fails."""
    by: dict[tuple[str, object, bool], dict[str, Result]] = defaultdict(dict)
    for r in results:
        if r.job.wait_factor is None:
            by[(r.job.suite, r.job.point, r.job.abort)][r.job.policy] = r
    lines: list[str] = []
    passed = 0
    failed: list[str] = []

    def verdict(ok: bool, what: str = "") -> str:
        nonlocal passed
        passed += ok
        if not ok:
            failed.append(what)
        return _check(ok)

    head = [
        "point",
        "attainment best (who)",
        policy,
        "ok",
        "req/s best",
        policy,
        "ok",
        "p99 TTFT lowest",
        policy,
        "ok",
    ]
    for suite, abort in (
        ("slora-a10g-sweep", False),
        ("slora-a10g-sweep", True),
        ("slora-bursty-abort", False),
        ("slora-bursty-abort", True),
    ):
        title = {"slora-a10g-sweep": "W1", "slora-bursty-abort": "W3"}[suite] + (
            " with abort" if abort else ""
        )
        lines += [
            "",
            f"### {title}: attainment >= best, throughput >= 0.98x best, p99 TTFT <= 1.1x lowest",
            "",
        ]
        lines += [_row(head), _row(["---"] * len(head))]
        for point in SUITES[suite].points:
            rs = by[(suite, point, abort)]
            base = [rs[b] for b in BASELINES]
            best_att = max(base, key=lambda r: r.attainment)
            best_thr = max(r.throughput for r in base)
            low_p99 = min(r.p99 for r in base)
            me = rs[policy]
            att_ok, thr_ok, p99_ok = latency_checks(base, me)
            lines.append(
                _row(
                    [
                        point,
                        f"{best_att.attainment:.3f} ({best_att.job.policy})",
                        f"{me.attainment:.3f}",
                        verdict(att_ok, f"{title} {point} attainment"),
                        f"{best_thr:.3f}",
                        f"{me.throughput:.3f}",
                        verdict(thr_ok, f"{title} {point} req/s"),
                        f"{low_p99:.1f}",
                        f"{me.p99:.1f}",
                        verdict(p99_ok, f"{title} {point} p99"),
                    ]
                )
            )
    lines += ["", "### W3 with abort: attainment above S-LoRA's early abort", ""]
    lines += [_row(["cv", "S-LoRA early abort", policy, "ok"]), _row(["---"] * 4)]
    for cv, ref in SLORA_EARLY_ABORT.items():
        me = by[("slora-bursty-abort", cv, True)][policy]
        ok = verdict(me.attainment > ref, f"W3 abort {cv} vs S-LoRA")
        lines.append(_row([cv, ref, f"{me.attainment:.3f}", ok]))
    lines += ["", "### W4: max / mean service difference <= 1.1x fair's, tokens/s >= 0.98x fcfs's", ""]
    head4 = [
        "scenario",
        "fcfs max / mean",
        "fair max / mean",
        f"{policy} max / mean",
        "ok",
        "tokens/s fcfs",
        policy,
        "ok",
    ]
    lines += [_row(head4), _row(["---"] * len(head4))]
    for sc in SUITES["vtc-fairness"].points:
        rs = by[("vtc-fairness", sc, False)]
        f, c, me = rs["fair"], rs["fcfs"], rs[policy]
        ok = me.max_diff <= 1.1 * f.max_diff and me.avg_diff <= 1.1 * f.avg_diff
        lines.append(
            _row(
                [
                    sc,
                    f"{c.max_diff:.0f} / {c.avg_diff:.0f}",
                    f"{f.max_diff:.0f} / {f.avg_diff:.0f}",
                    f"{me.max_diff:.0f} / {me.avg_diff:.0f}",
                    verdict(ok, f"W4 {sc} difference"),
                    f"{c.tokens_per_s:.0f}",
                    f"{me.tokens_per_s:.0f}",
                    verdict(me.tokens_per_s >= 0.98 * c.tokens_per_s, f"W4 {sc} tokens/s"),
                ]
            )
        )
    for suite, title in (("slora-a100-scale", "W2"), ("punica-popularity", "W5")):
        lines += ["", f"### {title}: throughput >= 0.98x best, adapter loads <= fcfs's", ""]
        h = ["point", "req/s best", policy, "ok", "loads fcfs", policy, "ok"]
        lines += [_row(h), _row(["---"] * len(h))]
        for point in SUITES[suite].points:
            rs = by[(suite, point, False)]
            best = max(rs[b].throughput for b in BASELINES)
            me, c = rs[policy], rs["fcfs"]
            lines.append(
                _row(
                    [
                        point,
                        f"{best:.3f}",
                        f"{me.throughput:.3f}",
                        verdict(me.throughput >= 0.98 * best, f"{title} {point} req/s"),
                        c.loads,
                        me.loads,
                        verdict(me.loads <= c.loads, f"{title} {point} loads"),
                    ]
                )
            )
    lines += ["", "### W1 at rate 2: no adapter's p99 wait above 3x the median adapter's", ""]
    lines += [_row(["policy", "max / median adapter p99 wait", "ok"]), _row(["---"] * 3)]
    for pol in (*BASELINES, policy):
        r = by[("slora-a10g-sweep", 2.0, False)][pol]
        ok = r.adapter_wait_ratio <= 3.0
        said = verdict(ok, "W1 2 adapter p99 wait") if pol == policy else _check(ok)
        lines.append(_row([pol, f"{r.adapter_wait_ratio:.2f}", said]))
    curve = sorted(
        (r for r in results if r.job.wait_factor is not None), key=lambda r: (r.job.point, r.job.wait_factor)
    )
    if curve:
        lines += ["", f"### Trade-off: `--slo-wait-factor` on W1 ({policy})", ""]
        lines += [_row(["rate", "wait factor", "attainment", "p99 TTFT s", "req/s"]), _row(["---"] * 5)]
        lines += [
            _row(
                [r.job.point, r.job.wait_factor, f"{r.attainment:.3f}", f"{r.p99:.1f}", f"{r.throughput:.3f}"]
            )
            for r in curve
        ]
    return lines, passed, failed


def _at_factor(job: Job, policy: str, factor: float | None, first: bool) -> bool:
    """Whether `job` belongs to the report of `policy` at wait factor `factor`: the baselines
    always, the policy's checks at that factor, the W1 curve in the first report only."""
    if job.wait_factor is not None:
        return first
    return job.policy != policy or job.slo_wait_factor == factor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="slo")
    p.add_argument(
        "--wait-factors", default="", help="comma-separated --slo-wait-factor values for the curve"
    )
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--bound", action="store_true", help="only the queueing bound on W1 at rate 2")
    p.add_argument("--kv-watermark", type=float, help="--policy's KV watermark (default: its own)")
    p.add_argument(
        "--baselines-kv-watermark", type=float, help="fcfs / affinity / fair's KV watermark (default: 0)"
    )
    p.add_argument(
        "--policy-wait-factors",
        default="",
        help="comma-separated --slo-wait-factor values of --policy: every check at each",
    )
    p.add_argument("--ratio-seeds", default="", help="comma-separated seeds: only the adapter wait check")
    p.add_argument(
        "--tpot-slo",
        type=float,
        help="seconds: every policy's attainment also asks TPOT <= this (DistServe's; vLLM's --goodput)",
    )
    p.add_argument(
        "--map-seeds", default="", help="comma-separated seeds: only the W1/W3 map of --policy-wait-factors"
    )
    p.add_argument(
        "--plot", type=Path, help="with --policy-wait-factors: the point-by-point map as a figure (PNG)"
    )
    a = p.parse_args()
    if a.ratio_seeds:
        t0 = time.perf_counter()
        lines = ratio_report(a.policy, [int(x) for x in a.ratio_seeds.split(",")], a.jobs)
        print(f"Simulated in {time.perf_counter() - t0:.0f} s. Machine: {machine()}.")
        print("\n".join(lines))
        return
    if a.bound:
        print(f"Machine: {machine()}.")
        print("\n".join(bound_report(a.policy, a.jobs)))
        return
    factors = [float(x) for x in a.wait_factors.split(",") if x.strip()]
    mine = [float(x) for x in a.policy_wait_factors.split(",") if x.strip()] or [None]
    if (a.plot or a.map_seeds) and len(mine) < 2:
        p.error("--plot and --map-seeds map --policy-wait-factors: give it two or more factors")
    if a.map_seeds:
        t0 = time.perf_counter()
        seeds = [int(x) for x in a.map_seeds.split(",")]
        lines = map_report(a.policy, seeds, mine, a.tpot_slo, a.jobs)  # type: ignore[arg-type]
        print(f"Simulated in {time.perf_counter() - t0:.0f} s. Machine: {machine()}.")
        print("\n".join(lines))
        return
    t0 = time.perf_counter()
    todo = [
        replace(
            j,
            kv_watermark=a.kv_watermark if j.policy == a.policy else a.baselines_kv_watermark,
            tpot_slo=a.tpot_slo,
        )
        for j in jobs(a.policy, factors)
    ]
    ours = [j for j in todo if j.policy == a.policy and j.wait_factor is None]  # the checks' runs
    todo = [j for j in todo if j not in ours] + [replace(j, slo_wait_factor=f) for f in mine for j in ours]
    with ProcessPoolExecutor(a.jobs) as pool:
        results = list(pool.map(run, todo))
    print(f"{len(todo)} simulations in {time.perf_counter() - t0:.0f} s. Machine: {machine()}.")
    if a.tpot_slo is not None:
        print(f"Attainment counts a request when TTFT < {m.SLO_S:g} s and TPOT <= {a.tpot_slo:g} s.")
    summary = []
    for f in mine:
        at_f = [r for r in results if _at_factor(r.job, a.policy, f, first=f == mine[0])]
        lines, passed, failed = report(at_f, a.policy)
        if f is not None:
            print(f"\n## {a.policy} with --slo-wait-factor {f:g}")
        print("\n".join(lines))
        print(f"\n{passed} checks hold, {len(failed)} do not.")
        summary.append((f, passed, failed))
    if len(mine) > 1:
        print(f"\n## {a.policy}'s wait factor: the checks held at each, and which fail\n")
        print(_row(["wait factor", "held", "failing"]))
        print(_row(["---"] * 3))
        for f, passed, failed in summary:
            print(_row([f"{f:g}", f"{passed} / {passed + len(failed)}", "; ".join(failed)]))
        fps = factor_points(results, a.policy)
        print("\n".join(factor_map(fps, a.policy)))
        if a.plot:
            plot_factor_points(fps, a.plot, a.policy)
            print(f"\nFigure: {a.plot}")


if __name__ == "__main__":
    main()
