"""Benchmark numbers, the markdown report and the plots.

Boundary: per-request records in, text and PNG files out. Definitions follow
shared/research/papers.md section 4:

    throughput   = generated tokens (or completed requests) / (last completion - first arrival)
    ttft         = first token - arrival          e2e = last token - arrival
    attainment   = share of requests with ttft < slo (6 s in S-LoRA)
"""

from __future__ import annotations

import datetime
import platform
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from loramux.bench.systems import RunResult


@dataclass(frozen=True)
class Summary:
    system: str
    mode: str
    tokens_per_s: float
    requests_per_s: float
    ttft_p50: float
    ttft_p99: float
    e2e_p50: float
    e2e_p99: float
    attainment: float
    adapter_loads: int
    completed: int
    load_seconds: tuple[float, float, float] | None = None  # read, copy into slot, steps waiting


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarize_run(run: RunResult, slo: float) -> Summary:
    done = [r for r in run.records if r.finish is not None]
    ttft = [r.first_token - r.arrival for r in done if r.first_token is not None]
    e2e = [r.finish - r.arrival for r in done]  # type: ignore[operator]
    tokens = sum(r.output_tokens for r in done)
    wall = max(run.wall, 1e-9)
    return Summary(
        run.system,
        run.mode,
        tokens / wall,
        len(done) / wall,
        _pct(ttft, 50),
        _pct(ttft, 99),
        _pct(e2e, 50),
        _pct(e2e, 99),
        sum(t < slo for t in ttft) / max(len(run.records), 1),
        run.adapter_loads,
        len(done),
        run.notes.get("load_seconds"),
    )


def table(summaries: list[Summary], reference: str = "loramux") -> str:
    """A markdown table; the ratio column compares loramux with each row, within a mode."""
    head = (
        "| mode | system | tokens/s | requests/s | TTFT p50 / p99 (s) | e2e p50 / p99 (s) | SLO attainment "
        "| adapter loads | loramux / this |"
    )
    lines = [head, "|" + "---|" * 9]
    for s in summaries:
        ref = next((x for x in summaries if x.system == reference and x.mode == s.mode), None)
        ratio = f"{ref.tokens_per_s / s.tokens_per_s:.2f}x" if ref and s.system != reference else ""
        att = f"{s.attainment:.2f}" if s.mode == "online" else "-"
        lines.append(
            f"| {s.mode} | {s.system} | {s.tokens_per_s:.1f} | {s.requests_per_s:.2f} | "
            f"{s.ttft_p50:.2f} / {s.ttft_p99:.2f} | {s.e2e_p50:.2f} / {s.e2e_p99:.2f} | {att} | "
            f"{s.adapter_loads} | {ratio} |"
        )
    return "\n".join(lines)


def plot_series(
    path: Path, title: str, xlabel: str, series: dict[str, list[tuple[float, float]]], logx: bool = False
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, points in series.items():
        xs, ys = zip(*sorted(points), strict=True) if points else ((), ())
        ax.plot(xs, ys, marker="o", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("generated tokens / s")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    dev = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {dev}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def write_section(doc: Path, key: str, body: str) -> None:
    """Put `body` between this key's markers in `doc`, replacing an earlier run of the same key."""
    start, end = f"<!-- loramux-bench:{key}:start -->", f"<!-- loramux-bench:{key}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# loramux benchmarks\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def today() -> str:
    return datetime.date.today().isoformat()
