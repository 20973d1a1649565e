"""What finding an adapter by name costs: its first request against one named at start.

    python benchmarks/bench_resolver.py [--cache-dir DIR] [--rounds 2] [--adapters 20]

Not a test. The bench's mid model (91M parameters, random weights, fp32) and bench_start.py's 100
rank-8 adapters (q_proj, v_proj), served two ways, alternating in each round:
- by name: `loramux serve MID --allowed-lora-dirs CACHE`: no adapter is loaded at start; a
  request naming `mid-adN` loads that folder on first use (server/resolver.py);
- named at start: `--lora-modules mid-ad0=... mid-ad99=...`: all 100 registered at start (the
  first --max-loras read ahead as the port opens, the rest on first use).
Once a base request has answered, one request after another (8 new tokens, greedy) to
`--adapters` adapters from mid-ad50 on (none of them read ahead), then the same again: seconds
per request, median and max, for the first and the second request of each adapter.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import httpx
from bench_start import Started, build

FIRST = 50  # adapters from mid-ad50 on: not among those read ahead at start


def one(url: str, model: str) -> float:
    body = {"model": model, "prompt": "say: hello world\n", "max_tokens": 8, "temperature": 0}
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loramux" / "bench")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--adapters", type=int, default=20)
    a = p.parse_args()
    logs = a.cache_dir / "resolver-logs"
    logs.mkdir(parents=True, exist_ok=True)
    model, modules = build(a.cache_dir)
    names = [f"mid-ad{i}" for i in range(FIRST, FIRST + a.adapters)]
    ways = {
        "by name (--allowed-lora-dirs)": ["--allowed-lora-dirs", str(a.cache_dir)],
        "named at start (--lora-modules)": ["--lora-modules", *(f"mid-{m}" for m in modules)],
    }
    times: dict[str, dict[str, list[float]]] = {w: {"first": [], "second": []} for w in ways}
    for k in range(a.rounds):
        for way, extra in ways.items():
            s = Started([str(model), "--served-model-name", "mid", *extra], None, logs / f"{k}-{way[:7]}.log")
            try:
                s.first_answer("mid")
                for turn in ("first", "second"):
                    times[way][turn] += [one(s.url, n) for n in names]
            finally:
                s.stop()
    cpu = platform.processor() or "cpu"
    print(f"machine: {platform.machine()}, {cpu}, python {platform.python_version()}")
    print(f"{a.rounds} rounds, {a.adapters} adapters each, one request at a time (8 new tokens)\n")
    print("| adapters | first request: median s | max s | second request: median s | max s |")
    print("|---|---|---|---|---|")
    for way, t in times.items():
        cells = [f"{fn(t[turn]):.3f}" for turn in ("first", "second") for fn in (statistics.median, max)]
        print(f"| {way} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
