"""Simulation reports: a Markdown table per point and policy, a JSON file, and matplotlib plots.

Boundary: SimResults in, files out. Plots (PNG, Agg backend):
- attainment_throughput.png: SLO attainment and throughput against the sweep
  variable, one line per policy;
- ttft_cdf.png: the TTFT distribution per policy, one panel per point;
- service.png: per-tenant service (VTC's in + 2 x out, tokens/s in a 60 s
  window) over time at the most loaded point (`offered_load`), one panel per
  policy, busiest tenants only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loramux.sim import metrics as m
from loramux.sim.run import SimResult


@dataclass(frozen=True)
class Row:
    point: str
    policy: str
    requests: int
    completed: int
    aborted: int
    throughput: float  # req/s
    tokens_per_s: float
    ttft: m.Stats
    e2e: m.Stats
    tpot: m.Stats  # time per output token after the first, s (vLLM's TPOT)
    attainment: float
    attainment_tpot: float | None  # with the TPOT target as well (None: no target given)
    satisfaction: float
    per_token_latency: float
    decode_per_token: float
    adapter_loads: int
    loads_per_s: float
    longest_wait: float
    fairness: m.Fairness | None
    steps: int
    sim_seconds: float  # virtual
    wall_seconds: float  # real


def summarize(
    point: object, res: SimResult, slo: float, fairness: bool = False, tpot_slo: float | None = None
) -> Row:
    recs = res.records
    horizon = float(int(max((r.arrival for r in recs), default=0.0)))
    return Row(
        str(point),
        res.policy,
        len(recs),
        sum(1 for r in recs if r.finish is not None and not r.aborted),
        sum(1 for r in recs if r.aborted),
        m.throughput(recs),
        m.token_throughput(recs),
        m.ttft_stats(recs),
        m.e2e_stats(recs),
        m.stats(d for r in recs if (d := m.tpot(r)) is not None),
        m.attainment(recs, slo),
        None if tpot_slo is None else m.attainment(recs, slo, tpot_slo),
        m.satisfaction(recs, slo),
        m.per_token_latency(recs),
        m.decode_per_token(recs),
        res.adapter_loads,
        m.loads_per_second(res.adapter_loads, recs),
        m.longest_wait(recs, res.end_time),
        m.fairness(recs, horizon) if fairness and len(m.tenants(recs)) > 1 else None,
        res.steps,
        res.end_time,
        res.wall_seconds,
    )


def _f(x: float, nd: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown_table(rows: Sequence[Row], sweep: str, tpot_slo: float | None = None) -> str:
    both = "" if tpot_slo is None else f" / with TPOT <= {1000 * tpot_slo:g} ms"
    head = (
        f"| {sweep} | policy | req/s | tok/s | TTFT mean / p50 / p90 / p99 (s) | e2e p50 (s) | "
        f"TPOT p50 / p99 (ms) | attainment{both} "
        "| satisfaction | adapter loads/s | longest wait (s) | aborted | sim s / wall s |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        t = r.ttft
        att = _f(r.attainment) + ("" if r.attainment_tpot is None else f" / {_f(r.attainment_tpot)}")
        lines.append(
            f"| {r.point} | {r.policy} | {_f(r.throughput)} | {_f(r.tokens_per_s, 0)} | "
            f"{_f(t.mean)} / {_f(t.p50)} / {_f(t.p90)} / {_f(t.p99)} | {_f(r.e2e.p50)} | "
            f"{_f(1000 * r.tpot.p50, 0)} / {_f(1000 * r.tpot.p99, 0)} | {att} | "
            f"{_f(r.satisfaction)} | {_f(r.loads_per_s)} | {_f(r.longest_wait, 1)} | {r.aborted} | "
            f"{_f(r.sim_seconds, 0)} / {_f(r.wall_seconds, 1)} |"
        )
    return "\n".join(lines)


def fairness_table(rows: Sequence[Row], sweep: str) -> str:
    fair = [r for r in rows if r.fairness is not None]
    if not fair:
        return ""
    lines = [
        f"| {sweep} | policy | max diff | avg diff | diff var | final acc. diff (tokens) | tokens/s |",
        "|" + "---|" * 7,
    ]
    for r in fair:
        f = r.fairness
        assert f is not None
        lines.append(
            f"| {r.point} | {r.policy} | {f.max_diff:.1f} | {f.avg_diff:.1f} | {f.var_diff:.0f} | "
            f"{f.acc_diff:.0f} | {f.tokens_per_s:.0f} |"
        )
    return "\n".join(lines)


def adapter_table(res: SimResult, top: int = 8) -> str:
    by = m.ttft_by_adapter(res.records)
    busiest = sorted(by.items(), key=lambda kv: -kv[1].n)[:top]
    lines = ["| adapter | requests | TTFT mean / p50 / p90 / p99 (s) |", "|---|---|---|"]
    for a, s in busiest:
        lines.append(
            f"| {'base' if a is None else f'a{a}'} | {s.n} | {_f(s.mean)} / {_f(s.p50)} / "
            f"{_f(s.p90)} / {_f(s.p99)} |"
        )
    return "\n".join(lines)


def _numeric(points: Sequence[str]) -> list[float] | None:
    try:
        return [float(p) for p in points]
    except ValueError:
        return None


def plot_all(
    out: Path, sweep: str, results: Sequence[tuple[str, SimResult]], rows: Sequence[Row], slo: float
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    points = list(dict.fromkeys(r.point for r in rows))
    policies = list(dict.fromkeys(r.policy for r in rows))
    xs = _numeric(points)
    pos = xs if xs is not None else list(range(len(points)))
    paths: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for pol in policies:
        by = {r.point: r for r in rows if r.policy == pol}
        axes[0].plot(pos, [by[p].attainment for p in points], marker="o", label=pol)
        axes[1].plot(pos, [by[p].throughput for p in points], marker="o", label=pol)
    for ax, ylabel in zip(axes, (f"SLO attainment (TTFT < {slo:g} s)", "throughput (req/s)"), strict=True):
        ax.set_xlabel(sweep)
        ax.set_ylabel(ylabel)
        if xs is None:
            ax.set_xticks(pos, points)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylim(-0.02, 1.02)
    save(fig, "attainment_throughput.png")

    fig, axes = plt.subplots(1, len(points), figsize=(3.2 * len(points) + 1, 3.4), squeeze=False)
    for ax, p in zip(axes[0], points, strict=True):
        for point, res in results:
            if point != p:
                continue
            ts = sorted(t for r in res.records if (t := m.ttft(r)) is not None)
            if ts:
                ax.plot(ts, [(i + 1) / len(res.records) for i in range(len(ts))], label=res.policy)
        ax.axvline(slo, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{sweep} = {p}", fontsize=9)
        ax.set_xlabel("TTFT (s)")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of requests")
    axes[0][0].legend(fontsize=8)
    save(fig, "ttft_cdf.png")

    busiest_point = max(points, key=lambda p: offered_load([r for q, r in results if q == p]))
    first = [res for point, res in results if point == busiest_point]
    fig, axes = plt.subplots(1, len(first), figsize=(4.5 * len(first), 3.4), squeeze=False)
    for ax, res in zip(axes[0], first, strict=True):
        end = max((r.finish for r in res.records if r.finish is not None), default=1.0)
        times = [end * i / 60 for i in range(61)]
        series = m.service_over_time(res.records, times)
        busiest = sorted(series, key=lambda u: -sum(series[u]))[:6]
        for u in busiest:
            ax.plot(times, series[u], label=u or "(none)")
        ax.set_title(f"{res.policy}, {sweep} = {busiest_point}", fontsize=9)
        ax.set_xlabel("time (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("service (in + 2 out tokens/s, 60 s window)")
    save(fig, "service.png")
    return paths


def offered_load(results: Sequence[SimResult]) -> float:
    """Tokens asked for (in + out) per second of arrivals, over the results of one point: the
    service plot is drawn where this is highest, where policies differ most."""
    best = 0.0
    for res in results:
        arrivals = [r.arrival for r in res.records]
        span = max(arrivals, default=0.0) - min(arrivals, default=0.0)
        tokens = sum(r.input_len + r.output_len for r in res.records)
        best = max(best, tokens / span if span > 0 else float(tokens))
    return best


def write_report(
    out: Path,
    title: str,
    intro: list[str],
    sweep: str,
    results: Sequence[tuple[str, SimResult]],
    slo: float,
    fairness: bool,
    tpot_slo: float | None = None,
) -> tuple[Path, list[Row]]:
    rows = [summarize(p, res, slo, fairness, tpot_slo) for p, res in results]
    pngs = plot_all(out, sweep, results, rows, slo)
    policies = list(dict.fromkeys(r.policy for r in rows))
    caps = []
    xs = _numeric([r.point for r in rows])
    if sweep == "rate" and xs is not None:
        for pol in policies:
            cap = m.capacity((float(r.point), r.attainment) for r in rows if r.policy == pol)
            caps.append(f"- capacity ({pol}): {'below the lowest rate' if cap is None else f'{cap:g} req/s'}")
    body = [f"# {title}", "", *intro, "", markdown_table(rows, sweep, tpot_slo), ""]
    if caps:
        body += ["Capacity (highest rate with attainment >= 0.9):", "", *caps, ""]
    ft = fairness_table(rows, sweep)
    if ft:
        body += ["VTC service difference (60 s window, 30 s warm-up, 20 ticks):", "", ft, ""]
    last = results[-1]
    body += [
        f"TTFT of the busiest adapters ({sweep} = {last[0]}, {last[1].policy}):",
        "",
        adapter_table(last[1]),
        "",
    ]
    points = list(dict.fromkeys(p for p, _ in results))
    busiest = max(points, key=lambda p: offered_load([r for q, r in results if q == p]))
    body += [
        f"![{p.stem}]({p.name})"
        + (f" (at {sweep} = {busiest}, the most loaded point)" if p.stem == "service" else "")
        for p in pngs
    ]
    path = out / "report.md"
    path.write_text("\n".join(body) + "\n")
    (out / "results.json").write_text(
        json.dumps(
            [
                {
                    **asdict(r),
                    "ttft_by_adapter": {str(k): asdict(v) for k, v in m.ttft_by_adapter(res.records).items()},
                }
                for r, (_, res) in zip(rows, results, strict=True)
            ],
            separators=(",", ":"),
            default=float,
        )
    )
    return path, rows
