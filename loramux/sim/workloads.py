"""Workloads for the simulator: papers.md section 3 (W1-W5), each from a seed, and trace replay.

Boundary: numbers only (arrival, adapter, tenant, prompt and output lengths);
no engine. The generators follow the papers' code draw for draw, so a seed
gives the papers' own traces:

- S-LoRA (W1-W3): `loramux.workload.generate_requests`, reused as is.
  Ranks by adapter index: S1 all 8, S2 [64, 32, 16, 8][i mod 4].
- VTC (W4): numpy's legacy generator seeded once. "uniform": per client,
  input lengths, output lengths, then a phase U(0,1)/rate; arrival j is
  phase + (j+1)/rate; with on/off period P client 0 is silent while
  floor(t/P) is odd. "poisson-short-long-2": P(client 0) = r0/(r0+r1) by a
  uniform draw per request, then input and output lengths, then Gamma gaps;
  client 0's input and output lengths are swapped. "dist_shift": three
  uniform phases of T/3 (on/off [0.5, 2] with P = 60 s; [1, 1]; [0.5, 1.5]).
- Punica (W5): PCG64(0xABCDABCD987); per request a prompt length
  -1 + 18 exp(0.8 z) (z standard normal) clipped to [1, maxlen - 2] and a
  total U[0, maxlen) raised to prompt + 2; both truncated to integers as
  numpy's int32 cast does. Adapter groups by popularity, shuffled by a second
  PCG64 of the same seed. All requests arrive at t = 0 (closed loop).

Trace replay reads CSV (a header row) or JSONL with the fields arrival,
adapter, tenant, prompt_len, output_len and optionally rank (adapter and tenant may be empty;
rank defaults to 8).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from loramux.workload import BenchRequest, WorkloadConfig, adapter_name, generate_requests

S1_RANKS = (8,)
S2_RANKS = (64, 32, 16, 8)


@dataclass(frozen=True)
class SimRequest:
    index: int
    arrival: float  # seconds after the start
    adapter: int | None  # adapter index, None for the base model
    input_len: int
    output_len: int
    tenant: str = ""


@dataclass(frozen=True)
class Workload:
    """One run's requests and the engine settings the workload names."""

    name: str
    requests: list[SimRequest]
    ranks: tuple[int, ...] = S1_RANKS  # adapter i has rank ranks[i % len(ranks)]
    num_adapters: int = 0
    duration: float = 0.0  # the trace's nominal length (the offered load's window)
    engine: dict[str, object] = field(default_factory=dict)  # SimSettings overrides
    description: str = ""
    paths: tuple[str, ...] = ()  # adapter i's PEFT directory (a trace's `path`), "" if not given

    def rank(self, adapter: int) -> int:
        return self.ranks[adapter % len(self.ranks)]

    def path(self, adapter: int) -> str:
        return self.paths[adapter] if adapter < len(self.paths) else ""

    def adapter_nbytes(self, adapter: int) -> int | None:
        """The bytes adapter `adapter` loads: its weights file's size when the trace gave its
        path, else None (the profile's bytes per rank then stand in)."""
        path = self.path(adapter)
        return (Path(path) / ADAPTER_WEIGHTS).stat().st_size if path else None


# --- S-LoRA ------------------------------------------------------------------------------------------


def slora(cfg: WorkloadConfig, ranks: tuple[int, ...] = S2_RANKS, name: str = "slora") -> Workload:
    return from_bench(generate_requests(cfg), cfg, ranks, name)


def from_bench(
    reqs: list[BenchRequest], cfg: WorkloadConfig, ranks: tuple[int, ...] = S2_RANKS, name: str = "slora"
) -> Workload:
    """The bench's requests (generate_requests, generate_ramp) as a simulator workload; each
    adapter its own tenant, as the bench's `tenant_per_adapter` runs them."""
    sim = [
        SimRequest(r.index, r.arrival, r.adapter, r.input_len, r.output_len, tenant=f"a{r.adapter}")
        for r in reqs
    ]
    return Workload(name, sim, ranks, cfg.num_adapters, cfg.duration)


# --- VTC ---------------------------------------------------------------------------------------------


def _uniform_client(
    out: list[tuple[float, int, int, int]],
    client: int,
    rate: float,
    duration: float,
    lengths: tuple[tuple[int, int], tuple[int, int]],
    start: float = 0.0,
    on_off: float | None = None,
) -> None:
    n = int(rate * duration)
    ins = np.random.randint(lengths[0][0], lengths[0][1], n)
    outs = np.random.randint(lengths[1][0], lengths[1][1], n)
    t = start + np.random.rand() / rate
    for j in range(n):
        t += 1 / rate
        if on_off is not None and client == 0 and int(t // on_off) & 1:
            continue
        out.append((t, client, int(ins[j]), int(outs[j])))


def vtc_uniform(
    rates: list[float],
    duration: float,
    lengths: tuple[tuple[int, int], tuple[int, int]] = ((256, 257), (256, 257)),
    on_off: float | None = None,
    seed: int = 42,
) -> list[SimRequest]:
    np.random.seed(seed)
    rows: list[tuple[float, int, int, int]] = []
    for i, rate in enumerate(rates):
        _uniform_client(rows, i, rate, duration, lengths, on_off=on_off)
    return _client_requests(rows)


def vtc_poisson_short_long_2(
    rates: tuple[float, float] = (8.0, 1.5),
    duration: float = 600.0,
    lengths: tuple[tuple[int, int], tuple[int, int]] = ((512, 513), (32, 33)),
    cv: float = 1.0,
    seed: int = 42,
) -> list[SimRequest]:
    np.random.seed(seed)
    n = int(sum(rates) * duration)
    which = (np.random.rand(n) > rates[0] / (rates[0] + rates[1])).astype(int)
    ins = np.random.randint(lengths[0][0], lengths[0][1], n)
    outs = np.random.randint(lengths[1][0], lengths[1][1], n)
    gaps = np.random.gamma(1 / cv**2, cv**2 / sum(rates), n)
    rows, t = [], 0.0
    for i in range(n):
        t += gaps[i]
        x, y = (int(outs[i]), int(ins[i])) if which[i] == 0 else (int(ins[i]), int(outs[i]))
        rows.append((t, int(which[i]), x, y))
    return _client_requests(rows)


def vtc_dist_shift(duration: float = 900.0, seed: int = 42) -> list[SimRequest]:
    np.random.seed(seed)
    lengths = ((256, 257), (256, 257))
    rows: list[tuple[float, int, int, int]] = []
    for phase, (rates, on_off) in enumerate((([0.5, 2.0], 60.0), ([1.0, 1.0], None), ([0.5, 1.5], None))):
        for i, rate in enumerate(rates):
            _uniform_client(rows, i, rate, duration / 3, lengths, phase * duration / 3, on_off)
    return _client_requests(rows)


def _client_requests(rows: list[tuple[float, int, int, int]]) -> list[SimRequest]:
    rows.sort(key=lambda r: r[0])  # stable: ties keep generation order, as Python's sort did
    return [SimRequest(i, t, None, x, y, tenant=f"client{c}") for i, (t, c, x, y) in enumerate(rows)]


VTC_SCENARIOS: dict[str, Callable[[int], list[SimRequest]]] = {
    "overload": lambda seed: vtc_uniform([1.5, 3.0], 360.0, seed=seed),
    "overload-multi": lambda seed: vtc_uniform([0.4] * 3 + [0.6] * 5, 360.0, seed=seed),
    "on_off_less": lambda seed: vtc_uniform([0.5, 2.0], 600.0, on_off=60.0, seed=seed),
    "poisson_short_long_2": lambda seed: vtc_poisson_short_long_2(seed=seed),
    "dist_shift": lambda seed: vtc_dist_shift(seed=seed),
}


# --- Punica ------------------------------------------------------------------------------------------

PUNICA_SEED = 0xABCDABCD987


def punica_lengths(num_requests: int, maxlen: int = 2048) -> tuple[list[int], list[int]]:
    rng = np.random.Generator(np.random.PCG64(seed=PUNICA_SEED))
    prompts, outputs = [], []
    for _ in range(num_requests):
        p = min(max(1.0, -1.0 + 18.0 * math.exp(0.8 * rng.standard_normal())), maxlen - 2)
        t = max(p + 2, float(rng.integers(0, maxlen)))
        prompts.append(int(p))
        outputs.append(int(t - p))
    return prompts, outputs


def punica_group_sizes(num_requests: int, popularity: str) -> list[int]:
    """Requests per adapter: distinct (1 each), uniform (ceil(sqrt(n)) groups), skewed (sizes
    growing by 1.5x, the rest in the last group, largest first), identical (one adapter)."""
    if popularity == "identical":
        return [num_requests]
    if popularity == "distinct":
        return [1] * num_requests
    if popularity == "uniform":
        k = math.ceil(math.sqrt(num_requests))
        sizes = [num_requests // k] * k
        for i in range(num_requests - sum(sizes)):
            sizes[i] += 1
        return sizes
    if popularity == "skewed":
        sizes: list[int] = []
        a = 1.0
        while sum(sizes) + math.floor(a) < num_requests:
            sizes.append(math.floor(a))
            a *= 1.5
        sizes.append(num_requests - sum(sizes))
        return sorted(sizes, reverse=True)
    raise ValueError(f"popularity {popularity!r}; use distinct, uniform, skewed or identical")


def punica(popularity: str, num_requests: int = 1024, maxlen: int = 2048) -> Workload:
    prompts, outputs = punica_lengths(num_requests, maxlen)
    sizes = punica_group_sizes(num_requests, popularity)
    idx = np.array([i for i, s in enumerate(sizes) for _ in range(s)], dtype=np.int32)
    np.random.Generator(np.random.PCG64(seed=PUNICA_SEED)).shuffle(idx)
    reqs = [
        SimRequest(i, 0.0, int(a), p, o, tenant=f"a{int(a)}")
        for i, (a, p, o) in enumerate(zip(idx.tolist(), prompts, outputs, strict=True))
    ]
    return Workload(f"punica-{popularity}", reqs, (16,), len(sizes), 0.0)


# --- trace replay ------------------------------------------------------------------------------------

TRACE_FIELDS = ("arrival", "adapter", "tenant", "prompt_len", "output_len", "rank", "path")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_trace(path: str | Path) -> Workload:
    """A CSV (with a header) or JSONL trace; adapters are named by any string, mapped to indices
    in order of first appearance; an empty adapter is the base model. `rank` (optional) is the
    adapter's LoRA rank; `path` (optional) its PEFT directory, whose weights file's size is what a
    load of it moves and whose adapter_config.json gives the rank when `rank` is empty (else 8).
    One adapter has one rank and one path throughout the trace."""
    p = Path(path)
    text = p.read_text()
    if p.suffix in (".jsonl", ".json"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(text.splitlines()))
    names: dict[str, int] = {}
    ranks: list[int] = []
    paths: list[str] = []
    reqs = []
    for i, row in enumerate(rows):
        missing = [f for f in ("arrival", "prompt_len", "output_len") if row.get(f) in (None, "")]
        if missing:
            raise ValueError(f"{p}: row {i + 1} lacks {missing}; a trace has the fields {list(TRACE_FIELDS)}")
        try:
            arrival, x, y = float(row["arrival"]), int(row["prompt_len"]), int(row["output_len"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: row {i + 1}: {e}") from None
        if arrival < 0 or x < 1 or y < 1:
            raise ValueError(f"{p}: row {i + 1}: arrival must be >= 0 and lengths >= 1")
        name = str(row.get("adapter") or "")
        adapter = names.setdefault(name, len(names)) if name else None
        if adapter is not None:
            where = str(row.get("path") or "")
            rank = _trace_rank(p, i, row.get("rank"), where)
            if adapter == len(ranks):
                ranks.append(rank)
                paths.append(where)
            elif row.get("rank") not in (None, "") and ranks[adapter] != rank:
                raise ValueError(
                    f"{p}: row {i + 1}: adapter {name!r} has rank {rank} here and {ranks[adapter]} before; "
                    f"give each adapter one rank"
                )
            elif where and paths[adapter] != where:
                raise ValueError(
                    f"{p}: row {i + 1}: adapter {name!r} has path {where!r} here and {paths[adapter]!r} "
                    f"before; give each adapter one path"
                )
        tenant = str(row.get("tenant") or name)
        reqs.append(SimRequest(i, arrival, adapter, x, y, tenant))
    reqs.sort(key=lambda r: r.arrival)
    duration = reqs[-1].arrival if reqs else 0.0
    return Workload(
        p.stem, reqs, tuple(ranks) or S1_RANKS, len(names), duration, paths=tuple(paths) if any(paths) else ()
    )


def _trace_rank(p: Path, i: int, value: object, where: str = "") -> int:
    if where:
        cfg, weights = Path(where) / "adapter_config.json", Path(where) / ADAPTER_WEIGHTS
        if not cfg.is_file() or not weights.is_file():
            raise ValueError(
                f"{p}: row {i + 1}: path {where!r} is not a PEFT LoRA directory (adapter_config.json and "
                f"{ADAPTER_WEIGHTS}); give the adapter's directory, or leave path empty"
            )
        if value in (None, ""):
            value = json.loads(cfg.read_text()).get("r")
    if value in (None, ""):
        return S1_RANKS[0]
    try:
        rank = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        rank = 0
    if rank < 1:
        raise ValueError(f"{p}: row {i + 1}: rank {value!r}; a LoRA rank is an integer >= 1")
    return rank


def save_trace(workload: Workload, path: str | Path) -> Path:
    p = Path(path)
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRACE_FIELDS)
        for r in workload.requests:
            adapter = "" if r.adapter is None else adapter_name(r.adapter)
            rank = "" if r.adapter is None else workload.rank(r.adapter)
            where = "" if r.adapter is None else workload.path(r.adapter)
            w.writerow([f"{r.arrival:.6f}", adapter, r.tenant, r.input_len, r.output_len, rank, where])
    return p


# --- the named suite (papers.md section 3) ----------------------------------------------------------


@dataclass(frozen=True)
class Suite:
    """A named workload: a sweep over one variable, each point one Workload."""

    name: str
    profile: str
    sweep: str  # what varies from point to point
    points: tuple[object, ...]
    make: Callable[[object, int], Workload]
    engine: dict[str, object] = field(default_factory=dict)
    abort_after: float | None = None  # S-LoRA's early abort: drop requests waiting this long
    description: str = ""

    def workload(self, point: object, seed: int) -> Workload:
        wl = self.make(point, seed)
        return replace(wl, engine={**self.engine, **wl.engine})


def _a10g(rate: float = 2.0, **kw: object) -> Callable[[object, int], Workload]:
    def make(point: object, seed: int) -> Workload:
        args = {"num_adapters": 200, "alpha": 1.0, "req_rate": rate, "cv": 1.0, "duration": 300.0, **kw}
        return slora(WorkloadConfig(**args, seed=seed), S2_RANKS)  # type: ignore[arg-type]

    return make


def _w1(point: object, seed: int) -> Workload:
    return _a10g(rate=float(point))(point, seed)  # type: ignore[arg-type]


def _w2(point: object, seed: int) -> Workload:
    cfg = WorkloadConfig(int(point), 1.0, 10.0, 1.0, 120.0, seed=seed)  # type: ignore[call-overload]
    return slora(cfg, S1_RANKS)


def _w3(point: object, seed: int) -> Workload:
    return _a10g(cv=float(point))(point, seed)  # type: ignore[arg-type]


def _w4(point: object, seed: int) -> Workload:
    reqs = VTC_SCENARIOS[str(point)](seed)
    tenants = len({r.tenant for r in reqs})
    return Workload(
        f"vtc-{point}", reqs, S1_RANKS, 0, max(r.arrival for r in reqs), description=f"{tenants} clients"
    )


def _w5(point: object, seed: int) -> Workload:
    return punica(str(point))


# Engine sizes: S-LoRA's pools are counted in token slots; pages here are 16 tokens.
_A10G = {
    "num_pages": 14500 // 16,
    "max_num_batched_tokens": 3072,
    "max_num_seqs": 1000,
    "max_loras": 64,
    "max_cpu_loras": 256,
}
_A100 = {
    "num_pages": 125000 // 16,
    "max_num_batched_tokens": 125000 // 6,
    "max_num_seqs": 1000,
    "max_loras": 128,
    "max_cpu_loras": 2048,
}

SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "slora-a10g-sweep",
            "a10g-llama7b",
            "rate",
            (1.0, 1.5, 2.0, 2.5),
            _w1,
            _A10G,
            description="W1: S-LoRA A10G, S2 ranks, n=200, alpha 1, cv 1, 300 s",
        ),
        Suite(
            "slora-a100-scale",
            "a100-80-llama7b",
            "adapters",
            (5, 100, 1000, 2000),
            _w2,
            _A100,
            description="W2: S-LoRA A100-80 Table 3, S1 (rank 8), rate 10, 120 s",
        ),
        Suite(
            "slora-bursty-abort",
            "a10g-llama7b",
            "cv",
            (1.0, 2.0, 4.0, 6.0, 8.0),
            _w3,
            _A10G,
            abort_after=5.5,
            description="W3: W1 at rate 2 over cv; early abort at 5.5 s of waiting",
        ),
        Suite(
            "vtc-fairness",
            "a10g-llama7b",
            "scenario",
            tuple(VTC_SCENARIOS),
            _w4,
            {"num_pages": 10000 // 16, "max_num_batched_tokens": 3072, "max_num_seqs": 1000},
            description="W4: VTC fairness, base model (LoRA off), tenant = client, pool 10 000 tokens",
        ),
        Suite(
            "punica-popularity",
            "a100-80-llama7b",
            "popularity",
            ("distinct", "uniform", "skewed", "identical"),
            _w5,
            {"max_num_seqs": 32, "max_loras": 32, "max_cpu_loras": 1024, "num_pages": 32 * 2048 // 16},
            description="W5: Punica closed loop, 1024 requests at t=0, batch 32, rank 16",
        ),
    )
}
