"""The step log: each step's cost features and measured seconds, as JSON lines (issue 25).

Boundary: the engine hands it one `SchedulerOutput` and the step's seconds; it writes lines to a
file and knows nothing else. `loramux simulate calibrate --from-log` fits a profile from such a
file (sim/calibrate.py), so the simulator's cost model can be measured on the load a server
actually carries rather than on a synthetic one. Off unless `--step-log PATH` (a setting of
`LogConfig`); the engine then checks one attribute per step and nothing more.

Lines, each a JSON object with a "kind":
- "start": the engine's sizes a profile needs (num_pages, page_size, max_model_len,
  commits_kv_as_used, device, dtype, model);
- "adapter": an adapter registered (uid, rank, nbytes), as ranks and sizes are not in the steps;
- "step": `f`, the features (StepFeatures' order), `s`, the step's seconds without adapter loads,
  and `loads`, the executor's load counters so far (host reads: count, seconds; device copies:
  count, seconds), from which read and copy rates are fitted.
Lines are buffered and written every 256 steps and on close.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramux.core.outputs import SchedulerOutput
from loramux.core.step_features import step_features

FLUSH_EVERY = 256


class StepLog:
    def __init__(self, path: str | Path, start: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("w")
        self._lines: list[str] = [json.dumps({"kind": "start", **start})]
        self.ranks: dict[int, int] = {}

    def adapter(self, uid: int, rank: int, nbytes: int) -> None:
        self.ranks[uid] = rank
        self._lines.append(json.dumps({"kind": "adapter", "uid": uid, "rank": rank, "nbytes": nbytes}))

    def step(self, out: SchedulerOutput, seconds: float, loads: tuple[float, float, float, float]) -> None:
        f = step_features(out, self.ranks)
        self._lines.append(
            json.dumps({"kind": "step", "step": out.step, "f": f[1:], "s": round(seconds, 7), "loads": loads})
        )
        if len(self._lines) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._lines:
            self._f.write("\n".join(self._lines) + "\n")
            self._f.flush()
            self._lines.clear()

    def close(self) -> None:
        self.flush()
        self._f.close()


def read_step_log(path: str | Path) -> tuple[dict[str, Any], dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """(the last start line, adapters by uid, step lines) of a step log; ValueError if it has none."""
    start: dict[str, Any] = {}
    adapters: dict[int, dict[str, Any]] = {}
    steps: list[dict[str, Any]] = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not JSON ({e}); is this a loramux step log?") from None
        kind = row.get("kind")
        if kind == "start":
            start = row
        elif kind == "adapter":
            adapters[int(row["uid"])] = row
        elif kind == "step":
            steps.append(row)
    if not start or not steps:
        raise ValueError(f"{path}: no start line or no steps; write one with --step-log PATH")
    return start, adapters, steps
