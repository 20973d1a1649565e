"""`loramux simulate calibrate MODEL_DIR`: measure a profile on this machine's real executor.

Two loads (issue 25). The default, `--load serving` (`calibrate_serving`), is
serving itself: the online bench's loop sends requests on the wall clock at an
arrival rate that steps up past capacity and back down (`--rates`), the
engine's step log records every step, and the profile is fitted from that log
(`profile_from_log`, also `--from-log PATH` for a log a server wrote). The
older synthetic load, `--load phases` (`Calibrator`, below), times steps that
run back to back in batches that fill and drain; on this CPU its small decode
steps ran 10-25 % slower than online steps of the same shape, and a profile
fitted on them predicted online latency 25-40 % high (issue 25).

Boundary: runs the real engine (`LLM`, the PyTorch executor) on a mixed load
it generates from a seed, times every `step()` as the benchmark does, reads
each step's features off its `SchedulerOutput` (profile.step_features, the
same function the simulator uses) and fits the profile's measured step
model: a table of cost by tokens in the step (points at every count up to 8,
then a quarter apart) plus linear terms for rows, context and adapters, by
least squares, every term >= 0 (a term that would come out negative is
dropped and the rest refitted). A table, not a line, because the BLAS picks
kernels by shape: here a one-token step costs half a two-token one and three
tokens cost more than four; a line through them is 20-50 % off exactly at the
1-4 rows an online load at a moderate rate is made of. Time spent loading
adapters inside a step is taken out of the step and fitted apart: disk reads
and slot copies, seconds per byte, from the executor's load counters.

The load comes in phases: B requests (B log-uniform from 1 to max_num_seqs)
arrive over 24 steps, so prefills land among decodes, and run until all have
finished, so every batch size down to one row is measured, small ones as
often as large; each phase draws its requests' adapters from a new set
(none, 1, 2, 4, max_loras or all of them), so batch size and adapter count
vary apart; prompt lengths are log-uniform in [8, 512], outputs U[4, 64]
(`--prompt-range`, `--output-range`: measure where your traffic lies); the
CLI's adapters have ranks r, 2r, 4r and 8r (8 to 64 by default). Plain (not
relative) least squares: the predicted total time is unbiased, which is what
latency and throughput add up.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loramux.bench.report import machine
from loramux.sampling_params import SamplingParams
from loramux.sim.profile import COST_TERMS, Profile, StepFeatures, step_features


def fit_nonnegative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: drop the most negative term and refit."""
    active = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        coef[active] = sol
        neg = [(coef[i], i) for i in active if coef[i] < 0]
        if not neg:
            return coef
        active.remove(min(neg)[1])


# The table's points: every token count up to 8 (BLAS kernels change with each small shape), then
# a quarter apart. Points with too few steps near them are dropped.
def _knot_candidates(top: float) -> list[float]:
    ks, k = [float(i) for i in range(1, 9)], 8.0
    while k < top:
        k = float(round(k * 1.25))
        ks.append(k)
    return ks


def table_knots(tokens: np.ndarray, min_support: float = 4.0) -> list[float]:
    """Points for the tokens table: the candidates below the largest step measured, and that
    step; an inner point whose hat holds fewer than `min_support` steps is dropped."""
    top = float(tokens.max())
    knots = [k for k in _knot_candidates(top) if k < top] + [top]
    while len(knots) > 2:
        support = hat_basis(tokens, knots).sum(axis=0)
        weak = min(range(1, len(knots) - 1), key=lambda i: support[i], default=None)
        if weak is None or support[weak] >= min_support:
            break
        knots.pop(weak)
    return knots


def hat_basis(tokens: np.ndarray, knots: Sequence[float]) -> np.ndarray:
    """Columns whose combination with the table's values is Profile.table_seconds at `tokens`
    (for tokens up to the last point: linear between points, flat before the first)."""
    k = np.asarray(knots, dtype=float)
    t = np.clip(tokens, k[0], k[-1])
    out = np.zeros((len(t), len(k)))
    if len(k) == 1:
        out[:, 0] = 1.0
        return out
    i = np.clip(np.searchsorted(k, t, side="right") - 1, 0, len(k) - 2)
    w = (t - k[i]) / (k[i + 1] - k[i])
    rows = np.arange(len(t))
    out[rows, i] = 1.0 - w
    out[rows, i + 1] += w
    return out


# The terms fitted next to the table (base_s and per_prefill_token_s are in the table).
LINEAR_TERMS = tuple(t for t in COST_TERMS if t not in ("base_s", "per_prefill_token_s"))

# The serving load's arrival rates (requests per second), stepped through in equal parts of its
# duration: up past the mid model's capacity on a 2-core CPU and back. Set them to span the rates
# you will simulate, past your machine's capacity (`--rates`).
SERVING_RATES = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 8.0, 4.0, 2.0, 1.0)


def fit_step_model(
    x: np.ndarray, y: np.ndarray, terms: Sequence[str] = LINEAR_TERMS
) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """The measured step model: the tokens table (tokens = prefill tokens + decode rows) plus the
    linear `terms` (a subset of LINEAR_TERMS; the others stay 0), all >= 0, by least squares. A
    table point that would come out negative is dropped and the rest refitted, so the table never
    dips to 0 between measured points."""
    unknown = set(terms) - set(LINEAR_TERMS)
    if unknown:
        raise ValueError(f"terms {sorted(unknown)} are not linear cost terms; choose from {LINEAR_TERMS}")
    names = [t for t in LINEAR_TERMS if t in terms]
    cols = [COST_TERMS.index(t) for t in names]
    tokens = x[:, 1] + x[:, 3]
    knots = table_knots(tokens)
    while True:
        design = np.hstack([x[:, cols], hat_basis(tokens, knots)])
        coef = fit_nonnegative(design, y)
        values = coef[len(cols) :]
        zero = [i for i, v in enumerate(values) if v <= 0]
        if not zero or len(knots) == 1:
            break
        knots = [k for i, k in enumerate(knots) if i not in zero] or knots[:1]
    fitted = {t: 0.0 for t in COST_TERMS}
    fitted.update({t: float(c) for t, c in zip(names, coef, strict=False)})
    return fitted, [(float(k), float(v)) for k, v in zip(knots, values, strict=True)]


class Calibrator:
    """The real engine of `model_dir` with these adapters, measured in as many slices as wanted
    (`measure`), then fitted (`profile`). Slices can be interleaved with other work, e.g. the real
    runs a simulation is compared with, so the profile sees the machine as they did."""

    def __init__(
        self,
        model_dir: str | Path,
        adapter_dirs: Sequence[str | Path],
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        kv_cache_memory: int = 2**30,
        max_loras: int = 8,
        device: str = "auto",
        seed: int = 0,
        prompt_range: tuple[int, int] = (8, 512),
        output_range: tuple[int, int] = (4, 64),
    ) -> None:
        from loramux import LLM

        self.model_dir = Path(model_dir)
        self.max_num_seqs, self.max_loras = max_num_seqs, max_loras
        self.engine_settings = {  # recorded in the profile
            "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "kv_cache_memory": kv_cache_memory,
            "max_loras": max_loras,
        }
        self.prompt_range, self.output_range = prompt_range, output_range
        cpu_loras = max(len(adapter_dirs), max_loras)
        self.llm = LLM(
            str(model_dir), **self.engine_settings, max_cpu_loras=cpu_loras, max_lora_rank=64, device=device
        )
        self.eng = self.llm.engine
        self.ex: Any = self.eng.executor
        self.names = [f"cal{i}" for i in range(len(adapter_dirs))]
        self.ranks: dict[int, int] = {}
        self.nbytes: dict[str, int] = {}
        for n, d in zip(self.names, adapter_dirs, strict=True):
            info = self.eng.add_lora(n, str(d))
            self.ranks[info.uid] = info.rank
            self.nbytes[n] = info.nbytes
        self._captured: list[Any] = []
        self._execute = self.ex.execute
        self.rng = random.Random(seed)
        self.rows: list[StepFeatures] = []
        self.times: list[float] = []
        self.seconds = 0.0
        self._sent = 0
        self._pool: list[str | None] = [None]
        self._warm_up()

    def _add(self) -> None:
        rng, (lo, hi) = self.rng, self.prompt_range
        hi = max(lo, min(hi, self.ex.max_model_len - self.output_range[1]))  # fits the model's limit
        n = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        prompt = [rng.randrange(3, self.ex.vocab_size) for _ in range(n)]
        params = SamplingParams(max_tokens=rng.randint(*self.output_range), ignore_eos=True, temperature=0.0)
        self.eng.add_request(f"c{self._sent}", prompt, params, lora_name=rng.choice(self._pool))
        self._sent += 1

    def _warm_up(self) -> None:
        """Three requests through every path, not measured."""
        for _ in range(3):
            self._add()
        while self.eng.has_unfinished_requests():
            self.eng.step()

    def measure(self, requests: int, progress: bool = True) -> None:
        """Run `requests` more requests in phases and keep every step's features and time."""
        import torch
        from tqdm import tqdm

        eng, ex, rng, stats = self.eng, self.ex, self.rng, self.ex.load_stats
        max_num_seqs, max_loras = self.max_num_seqs, self.max_loras

        def spy(out: Any) -> Any:
            self._captured.append(out)
            return self._execute(out)

        ex.execute = spy
        left = requests
        bar = tqdm(total=requests, desc="calibrate", unit="req", disable=not progress)
        t_start = time.perf_counter()
        while left > 0:  # one phase: a batch of B requests arriving over 24 steps, then drained
            b = min(int(math.exp(rng.uniform(0.0, math.log(max_num_seqs + 1)))), left)
            left -= b
            k = rng.choice([0, 1, 2, 4, max_loras, len(self.names)])
            self._pool = [None] if k == 0 else list(rng.sample(self.names, min(k, len(self.names))))
            due = sorted(rng.randrange(24) for _ in range(b))
            step = 0
            while due or eng.has_unfinished_requests():
                while due and due[0] <= step:
                    due.pop(0)
                    self._add()
                step += 1
                if not eng.has_unfinished_requests():
                    continue
                self._captured.clear()
                loads0 = stats.device_seconds + stats.wait_seconds
                t0 = time.perf_counter()
                outs = eng.step()
                if getattr(ex.device, "type", "cpu") == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0 - (stats.device_seconds + stats.wait_seconds - loads0)
                bar.update(sum(1 for o in outs if o.finished))
                if self._captured and self._captured[0].seqs:
                    self.rows.append(step_features(self._captured[0], self.ranks))
                    self.times.append(dt)
        bar.close()
        ex.execute = self._execute
        self.seconds += time.perf_counter() - t_start

    def profile(self, name: str, save_steps: str | Path | None = None) -> tuple[Profile, dict[str, float]]:
        """Fit every step measured so far; returns the profile and fit-quality numbers."""
        ex, stats = self.ex, self.ex.load_stats
        x = np.array(self.rows, dtype=float)
        y = np.array(self.times)
        if save_steps is not None:  # the measured steps, for a look at the fit (np.load: x, y)
            np.savez(save_steps, x=x, y=y)
        mean_bytes = float(np.mean(list(self.nbytes.values())))
        return fit_profile(
            name,
            "measured by `loramux simulate calibrate`",
            x,
            y,
            seconds=self.seconds,
            read_rate=mean_bytes * stats.host_loads / stats.host_seconds if stats.host_seconds > 0 else 1e9,
            copy_rate=mean_bytes * stats.device_loads / stats.device_seconds
            if stats.device_seconds > 0
            else 1e10,
            sizes={
                "num_pages": int(ex.num_pages),
                "page_size": int(ex.page_size),
                "max_model_len": int(ex.max_model_len),
                "commits_kv_as_used": bool(getattr(ex, "commits_kv_as_used", False)),
                "adapter_bytes_per_rank": int(sum(self.nbytes.values()) / sum(self.ranks.values())),
            },
            engine={
                "model": self.model_dir.name,
                **self.engine_settings,
                "prompt_range": list(self.prompt_range),
                "output_range": list(self.output_range),
                "device": str(ex.device),
                "dtype": str(ex.dtype).replace("torch.", ""),
            },
        )

    def close(self) -> None:
        if hasattr(self.ex, "close"):
            self.ex.close()


def fit_profile(
    name: str,
    how: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seconds: float,
    read_rate: float,
    copy_rate: float,
    sizes: dict[str, Any],
    engine: dict[str, Any],
    terms: Sequence[str] = LINEAR_TERMS,
) -> tuple[Profile, dict[str, float]]:
    """A profile from measured steps (x: StepFeatures rows, y: seconds) and the engine's sizes;
    returns it with fit-quality numbers."""
    coefs, table = fit_step_model(x, y, terms)
    model = Profile("fit", "fit", **coefs, tokens_table=tuple(table))
    pred = np.array([model.step_seconds(StepFeatures(*row)) for row in x])
    quality = {
        "steps": float(len(y)),
        "seconds": seconds,
        "r2": float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()) if len(y) > 1 else 1.0,
        "median_rel_error": float(np.median(np.abs(pred - y) / y)),
        "total_rel_error": float(abs(pred.sum() - y.sum()) / y.sum()),
    }
    profile = Profile(
        name=name,
        source=(
            f"{how} on {machine()} on {time.strftime('%Y-%m-%d')}: {len(y)} steps, R^2 {quality['r2']:.3f}, "
            f"median step error {quality['median_rel_error']:.1%}"
        ),
        **coefs,
        tokens_table=tuple(table),
        jitter=float(np.std(np.log(y / np.maximum(pred, 1e-9)))),
        read_base_s=0.0,
        read_bytes_per_s=float(read_rate),
        copy_base_s=0.0,
        copy_bytes_per_s=float(copy_rate),
        **sizes,
        engine=engine,
        notes="Step time excludes adapter loads (fitted apart, per byte). Adapter bytes scale with rank "
        "for the calibration adapters' target modules.",
    )
    return profile, quality


def profile_from_log(
    path: str | Path, name: str, terms: Sequence[str] = LINEAR_TERMS, how: str | None = None
) -> tuple[Profile, dict[str, float]]:
    """Fit a profile from a step log (`--step-log`): the steps a server or benchmark really ran,
    with their features and times; load rates from its counters, sizes from its start line."""
    from loramux.engine.step_log import read_step_log

    start, adapters, steps = read_step_log(path)
    x = np.array([[1.0, *s["f"]] for s in steps], dtype=float)
    y = np.array([s["s"] for s in steps], dtype=float)
    keep = y > 0
    host_loads, host_s, dev_loads, dev_s = steps[-1]["loads"]
    nbytes = [a["nbytes"] for a in adapters.values()]
    mean_bytes = float(np.mean(nbytes)) if nbytes else 0.0
    ranks = sum(a["rank"] for a in adapters.values())
    return fit_profile(
        name,
        how or f"fitted by `loramux simulate calibrate --from-log` from {Path(path).name}",
        x[keep],
        y[keep],
        seconds=float(y.sum()),
        read_rate=mean_bytes * host_loads / host_s if host_s > 0 and host_loads and mean_bytes else 1e9,
        copy_rate=mean_bytes * dev_loads / dev_s if dev_s > 0 and dev_loads and mean_bytes else 1e10,
        sizes={
            "num_pages": int(start["num_pages"]),
            "page_size": int(start["page_size"]),
            "max_model_len": int(start["max_model_len"]),
            "commits_kv_as_used": bool(start.get("commits_kv_as_used", False)),
            "adapter_bytes_per_rank": int(sum(nbytes) / ranks) if ranks else 0,
        },
        engine={
            k: v for k, v in start.items() if k not in ("kind", "num_pages", "page_size", "max_model_len")
        },
        terms=terms,
    )


def calibrate_profile(
    model_dir: str | Path,
    adapter_dirs: Sequence[str | Path],
    name: str,
    *,
    requests: int = 240,
    progress: bool = True,
    save_steps: str | Path | None = None,
    **settings: Any,
) -> tuple[Profile, dict[str, float]]:
    """Measure `model_dir` with these adapters in one go (settings: Calibrator's keywords)."""
    cal = Calibrator(model_dir, adapter_dirs, **settings)
    try:
        cal.measure(requests, progress)
        return cal.profile(name, save_steps)
    finally:
        cal.close()


def calibrate_serving(
    model_dir: str | Path,
    adapter_dirs: Sequence[str | Path],
    name: str,
    *,
    rates: Sequence[float] = SERVING_RATES,
    duration: float = 60.0,
    prompt_range: tuple[int, int] = (8, 512),
    output_range: tuple[int, int] = (4, 64),
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    kv_cache_memory: int = 2**30,
    max_loras: int = 8,
    device: str = "auto",
    seed: int = 0,
    terms: Sequence[str] = LINEAR_TERMS,
) -> tuple[Profile, dict[str, float]]:
    """Measure `model_dir` on a serving load: the online bench's loop (requests arrive on the
    wall clock) with the step log on, the arrival rate stepping through `rates` over `duration`
    seconds (generate_ramp: batches grow past capacity and shrink back), each request's adapter
    drawn uniformly from `adapter_dirs`; then the profile is fitted from that log as `--from-log` fits one."""
    from loramux.bench.systems import LoramuxSettings, make_prompts, run_loramux
    from loramux.workload import WorkloadConfig, generate_ramp

    config = json.loads((Path(model_dir) / "config.json").read_text())
    lo, hi = prompt_range
    limit = config.get("max_position_embeddings")
    hi = max(lo + 1, min(hi, limit - output_range[1])) if limit else hi  # fits the model's limit
    cfg = WorkloadConfig(len(adapter_dirs), 1.0, 1.0, 1.0, duration, (lo, hi), output_range, seed)
    reqs = generate_ramp(cfg, rates)
    vocab = int(config["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="loramux-cal-log-") as tmp:
        log = Path(tmp) / "steps.jsonl"
        settings = LoramuxSettings(
            max_loras=max_loras,
            max_cpu_loras=max(len(adapter_dirs), max_loras),
            max_lora_rank=64,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_memory=kv_cache_memory,
            device=device,
            step_log=str(log),
        )
        run_loramux(
            Path(model_dir),
            [Path(d) for d in adapter_dirs],
            reqs,
            make_prompts(reqs, vocab, seed),
            "online",
            settings,
        )
        return profile_from_log(
            log,
            name,
            terms,
            how=f"measured by `loramux simulate calibrate` on a serving ramp of {len(reqs)} requests "
            f"at {'/'.join(f'{r:g}' for r in rates)} req/s",
        )


def calibrate(a: argparse.Namespace) -> Profile:
    """The CLI: 16 random adapters on q_proj and v_proj of ranks r, 2r, 4r and 8r (at most 64), so the
    rank terms are measured over the range a workload uses, not extrapolated."""
    from loramux.bench.artifacts import write_random_adapter

    if a.from_log is not None:
        profile, q = profile_from_log(a.from_log, a.name or f"{Path(a.from_log).stem}-profile")
        path = profile.save(a.profile_out)
        print(
            f"wrote {path}: {q['steps']:.0f} logged steps, R^2 {q['r2']:.3f}, median step error "
            f"{q['median_rel_error']:.1%}, total {q['total_rel_error']:.1%}"
        )
        return profile
    if a.model_dir is None:
        raise ValueError("calibrate measures MODEL_DIR, or fits a step log: give one, or --from-log PATH")
    model_dir = Path(a.model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json; give a Hugging Face model directory")
    with tempfile.TemporaryDirectory(prefix="loramux-cal-") as tmp:
        dirs = [
            write_random_adapter(
                Path(tmp) / f"a{i}", model_dir, min(64, a.rank << (i % 4)), ("q_proj", "v_proj"), seed=i
            )
            for i in range(16)
        ]
        common = {
            "max_num_seqs": a.cal_max_num_seqs,
            "max_num_batched_tokens": a.cal_max_num_batched_tokens,
            "kv_cache_memory": a.kv_cache_memory,
            "device": a.device,
            "prompt_range": tuple(a.prompt_range),
            "output_range": tuple(a.output_range),
            "max_loras": a.max_loras_cal,
        }
        name = a.name or f"{model_dir.name}-calibrated"
        if a.load == "serving":
            rates, duration = a.cal_rates or SERVING_RATES, a.cal_duration
            profile, q = calibrate_serving(model_dir, dirs, name, rates=rates, duration=duration, **common)
        else:
            profile, q = calibrate_profile(model_dir, dirs, name, requests=a.requests, **common)
    path = profile.save(a.profile_out)
    print(
        f"wrote {path}: {q['steps']:.0f} steps in {q['seconds']:.0f} s, R^2 {q['r2']:.3f}, median step error "
        f"{q['median_rel_error']:.1%}, total {q['total_rel_error']:.1%}"
    )
    return profile
