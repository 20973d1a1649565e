"""S-LoRA's synthetic workload (benchmarks/trace.py::generate_requests), draw for draw.

Boundary: numbers only; no loramux import. The bench (loramux bench) and the
simulator (loramux simulate) both draw their S-LoRA traffic here. With numpy's
legacy global generator seeded once, the draws come in S-LoRA's order: adapter
indices, input lengths, output lengths, then Gamma inter-arrival gaps, so seed
42 reproduces the reference traces in shared/research/papers.md section 2.1
exactly.

    adapter = floor(power(alpha) * n)      P(index <= k) = (k / n) ** alpha; alpha = 1 is uniform
    in_len  ~ U[in_lo, in_hi)              out_len ~ U[out_lo, out_hi)
    gaps    ~ Gamma(shape = 1 / cv**2, scale = cv**2 / rate); arrival = cumulative sum
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class WorkloadConfig:
    num_adapters: int
    alpha: float = 1.0
    req_rate: float = 2.0
    cv: float = 1.0
    duration: float = 300.0
    input_range: tuple[int, int] = (8, 512)  # [lo, hi)
    output_range: tuple[int, int] = (8, 512)
    seed: int = 42

    def __post_init__(self) -> None:
        if self.num_adapters < 1:
            raise ValueError(f"num_adapters={self.num_adapters}; it must be at least 1")
        if self.alpha <= 0 or self.req_rate <= 0 or self.cv <= 0 or self.duration <= 0:
            raise ValueError("alpha, req_rate, cv and duration must all be positive")
        for name, (lo, hi) in (("input_range", self.input_range), ("output_range", self.output_range)):
            if not 1 <= lo < hi:
                raise ValueError(f"{name}={(lo, hi)}; it must satisfy 1 <= lo < hi")

    @property
    def num_requests(self) -> int:
        return int(self.req_rate * self.duration)


@dataclass(frozen=True)
class BenchRequest:
    index: int
    adapter: int  # adapter index in [0, num_adapters)
    input_len: int
    output_len: int
    arrival: float  # seconds after the start


def adapter_name(i: int) -> str:
    """The name of adapter `i` in every generated workload."""
    return f"a{i}"


def generate_requests(cfg: WorkloadConfig) -> list[BenchRequest]:
    np.random.seed(seed=cfg.seed)
    n = cfg.num_requests
    adapters = np.floor(np.random.power(cfg.alpha, n) * cfg.num_adapters).astype(int)
    in_lens = np.random.randint(cfg.input_range[0], cfg.input_range[1], n)
    out_lens = np.random.randint(cfg.output_range[0], cfg.output_range[1], n)
    gaps = np.random.gamma(shape=1.0 / cfg.cv**2, scale=cfg.cv**2 / cfg.req_rate, size=n)
    arrivals = np.cumsum(gaps)
    return [
        BenchRequest(i, int(a), int(x), int(y), float(t))
        for i, (a, x, y, t) in enumerate(zip(adapters, in_lens, out_lens, arrivals, strict=True))
    ]


def generate_ramp(cfg: WorkloadConfig, rates: Sequence[float]) -> list[BenchRequest]:
    """Arrivals whose rate steps through `rates`, cfg.duration / len(rates) seconds at each (the
    segment i drawn as above with seed cfg.seed + i): a load whose batches grow and shrink, past
    the engine's capacity and back when the rates go that high, as serving does over a day."""
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"rates={list(rates)}; give one or more positive rates (requests per second)")
    seg = cfg.duration / len(rates)
    out: list[BenchRequest] = []
    for i, rate in enumerate(rates):
        for r in generate_requests(replace(cfg, req_rate=rate, duration=seg, seed=cfg.seed + i)):
            if r.arrival < seg:  # the segment's own window; the next one starts at (i + 1) * seg
                out.append(BenchRequest(len(out), r.adapter, r.input_len, r.output_len, i * seg + r.arrival))
    return out


@dataclass(frozen=True)
class WorkloadSummary:
    num_requests: int
    distinct_adapters: int
    top1_share: float
    top10_share: float
    mean_input: float
    mean_output: float
    last_arrival: float


def summarize(reqs: list[BenchRequest]) -> WorkloadSummary:
    counts = np.bincount([r.adapter for r in reqs])
    top = np.sort(counts)[::-1]
    n = len(reqs)
    return WorkloadSummary(
        n,
        int((counts > 0).sum()),
        float(top[0] / n),
        float(top[:10].sum() / n),
        float(np.mean([r.input_len for r in reqs])),
        float(np.mean([r.output_len for r in reqs])),
        reqs[-1].arrival,
    )
