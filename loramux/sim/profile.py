"""A hardware profile: what a step and an adapter load cost, and the engine's sizes (issue 11).

Boundary: numbers in, seconds out; no torch, no engine. The step-time model
is a sum of terms in features that `step_features` reads off a `SchedulerOutput`:

    step_s = base_s
           + max(floor_s, per_prefill_token_s * prefill tokens + per_decode_row_s * decode rows)
           + tokens_table(prefill tokens + decode rows)   (measured curve, see below)
           + per_prefill_seq_s    * prefill rows          (each has its own set-up and sampling)
           + per_context_token_s  * attended context      (sum over rows of start_pos + tokens)
           + per_adapter_s        * distinct adapters in the step
           + per_adapter_rank_s   * sum of the distinct adapters' ranks   (their weights are read)
           + per_lora_rank_token_s * sum over rows of tokens x adapter rank

Prefill tokens are those of rows computing more than one token, decode rows
those computing one. A profile derived from published figures gives a
roofline: the floor is the weights read once per step, the slopes the FLOPs
per token. A measured profile (`loramux simulate calibrate`) gives
`tokens_table` instead: the step's cost by the number of tokens it computes,
as (tokens, seconds) points, linear between them and past the end along the
slope of its upper half. It is measured, not a straight line, because BLAS libraries
choose kernels by matrix shape: on this CPU a one-token step (matrix-vector)
costs 31 ms and a two-token one 58 ms, three tokens 77 ms and four 58 ms;
GPUs have the same kind of steps at their tile and CUDA-graph sizes.

Measured steps scatter around the model (this CPU: about 10 % at the
median); `jitter` is the standard deviation of log(measured / modelled) and
the simulator multiplies each step's cost by a seeded lognormal factor of
mean 1 with that spread, so that a request arriving mid-step waits the
residual of a step as variable as the real ones. 0 makes every step exact.

An adapter costs `read_base_s + bytes / read_bytes_per_s` to read from disk
into host memory (on the reader thread, one read at a time) and
`copy_base_s + bytes / copy_bytes_per_s` to copy into a device slot (inside
the step that needs it). A profile is a small JSON file; `source` says
whether it was measured (`loramux simulate calibrate`) or derived from
published figures.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramux.core.step_features import StepFeatures, step_features

__all__ = ["COST_TERMS", "Profile", "StepFeatures", "shipped_profiles", "step_features"]

PROFILES_DIR = Path(__file__).parent / "profiles"

COST_TERMS = (
    "base_s",
    "per_prefill_token_s",
    "per_prefill_seq_s",
    "per_decode_row_s",
    "per_context_token_s",
    "per_adapter_s",
    "per_adapter_rank_s",
    "per_lora_rank_token_s",
)


@dataclass(frozen=True)
class Profile:
    """One machine and model: step cost terms, adapter load rates, and the engine sizes."""

    name: str
    source: str  # "measured ..." or "derived ...": where the numbers come from
    base_s: float
    per_prefill_token_s: float
    per_decode_row_s: float
    per_prefill_seq_s: float = 0.0
    floor_s: float = 0.0
    tokens_table: tuple[tuple[float, float], ...] = ()  # (tokens in the step, seconds), measured
    jitter: float = 0.0  # std of log(measured / modelled step time)
    per_context_token_s: float = 0.0
    per_adapter_s: float = 0.0
    per_adapter_rank_s: float = 0.0
    per_lora_rank_token_s: float = 0.0
    read_base_s: float = 0.0
    read_bytes_per_s: float = 1e9
    copy_base_s: float = 0.0
    copy_bytes_per_s: float = 1e10
    num_pages: int = 1024  # KV pool, in pages of page_size tokens
    page_size: int = 16
    max_model_len: int = 4096
    commits_kv_as_used: bool = False  # CPU: the engine keeps few idle prefix pages (issue 15)
    adapter_bytes_per_rank: int = 0  # bytes of a rank-1 adapter (ranks scale it linearly)
    engine: dict[str, Any] = field(default_factory=dict)  # engine settings the profile was made with
    notes: str = ""

    def __post_init__(self) -> None:
        for name in (*COST_TERMS, "floor_s", "jitter", "read_base_s", "copy_base_s"):
            v = getattr(self, name)
            if not v >= 0:
                raise ValueError(f"profile {self.name!r}: {name}={v}; cost terms must be >= 0")
        for name in ("read_bytes_per_s", "copy_bytes_per_s", "num_pages", "page_size", "max_model_len"):
            if not getattr(self, name) > 0:
                raise ValueError(f"profile {self.name!r}: {name} must be positive")
        table = tuple((float(t), float(v)) for t, v in self.tokens_table)
        if any(t < 1 or not v >= 0 for t, v in table) or any(
            b[0] <= a[0] for a, b in itertools.pairwise(table)
        ):
            raise ValueError(
                f"profile {self.name!r}: tokens_table must be [tokens, seconds] points with tokens >= 1 "
                "increasing and seconds >= 0"
            )
        object.__setattr__(self, "tokens_table", table)
        if self.base_s + self.per_decode_row_s + self.per_prefill_token_s + sum(v for _, v in table) <= 0:
            raise ValueError(f"profile {self.name!r}: a step must cost something (all step terms are 0)")

    # --- costs ---
    def step_seconds(self, f: StepFeatures) -> float:
        compute = self.per_prefill_token_s * f.prefill_tokens + self.per_decode_row_s * f.decode_rows
        return (
            self.base_s
            + (compute if compute > self.floor_s else self.floor_s)
            + (self.table_seconds(f.prefill_tokens + f.decode_rows) if self.tokens_table else 0.0)
            + self.per_prefill_seq_s * f.prefill_rows
            + self.per_context_token_s * f.context_tokens
            + self.per_adapter_s * f.adapters
            + self.per_adapter_rank_s * f.adapter_ranks
            + self.per_lora_rank_token_s * f.lora_rank_tokens
        )

    def table_seconds(self, tokens: float) -> float:
        """tokens_table at `tokens`: linear between points, flat before the first; past the last,
        along the slope from the point at half its tokens or below to the last (never downwards;
        the upper half, not one segment, so a kink at the end does not set the slope)."""
        table = self.tokens_table
        i = bisect.bisect_left(table, tokens, key=lambda p: p[0])
        if i == 0:
            return table[0][1]
        if i == len(table):
            if i == 1:
                return table[0][1]
            x1, y1 = table[-1]
            x0, y0 = next(p for p in reversed(table[:-1]) if p[0] <= x1 / 2 or p is table[0])
            return y1 + max(0.0, (y1 - y0) / (x1 - x0)) * (tokens - x1)
        (x0, y0), (x1, y1) = table[i - 1], table[i]
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def read_seconds(self, nbytes: int) -> float:
        return self.read_base_s + nbytes / self.read_bytes_per_s

    def copy_seconds(self, nbytes: int) -> float:
        return self.copy_base_s + nbytes / self.copy_bytes_per_s

    def adapter_bytes(self, rank: int) -> int:
        return self.adapter_bytes_per_rank * rank

    # --- files ---
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_json())
        return p

    @classmethod
    def load(cls, name_or_path: str | Path) -> Profile:
        """A profile file, or the name of a shipped one (`loramux simulate --list-profiles`)."""
        p = Path(name_or_path)
        if not p.is_file():
            shipped = PROFILES_DIR / f"{name_or_path}.json"
            if not shipped.is_file():
                raise ValueError(
                    f"no profile {str(name_or_path)!r}: give a JSON file or one of {shipped_profiles()}"
                )
            p = shipped
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"profile {p}: not valid JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"profile {p}: unknown keys {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ValueError(f"profile {p}: {e}") from None


def shipped_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))
