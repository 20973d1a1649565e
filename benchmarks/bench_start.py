"""Start-up time and memory of `loramux serve` (issue 15).

    python benchmarks/bench_start.py [--cache-dir DIR] [--starts 3] [--baseline CHECKOUT]

Not a test. Two scenarios, each started --starts times as a new process, on 127.0.0.1:
- demo: `loramux serve` with no model. Seconds from the process start to the first completion
  answered (the client sends one every 20 ms until one succeeds: before the port opens the
  connection is refused).
- 100 adapters: `loramux serve MID --lora-modules ad0=... ad99=...`, the bench's mid model (91M
  parameters, random weights, fp32) with 100 rank-8 adapters on q_proj and v_proj, all other flags
  default. Seconds to the first answer (a request to ad0), then 256 mixed requests (16 concurrent
  clients; ad0..ad99 and the base model drawn uniformly; prompts of 24 words; 8-64 tokens each,
  ignore_eos; --requests), then the server's resident memory (VmRSS) and its peak (VmHWM).
With --baseline CHECKOUT, every start alternates with the same command run from that checkout
(PYTHONPATH=CHECKOUT, e.g. `git worktree add /tmp/base <rev>`), so both see the same machine load.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

N_ADAPTERS, N_REQUESTS, CONCURRENCY = 100, 256, 16
WORDS = "the quick brown fox jumps over the lazy dog page batch token cache river night blue".split()


def build(cache: Path) -> tuple[Path, list[str]]:
    from loramux.bench.artifacts import build_random_model, write_random_adapter

    model = build_random_model(cache / "mid", "mid")
    modules = []
    for i in range(N_ADAPTERS):
        path = cache / f"mid-ad{i}"
        if not (path / "adapter_config.json").is_file():
            write_random_adapter(path, model, 8, ("q_proj", "v_proj"), seed=100 + i)
        modules.append(f"ad{i}={path}")
    return model, modules


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


class Started:
    def __init__(self, args: list[str], checkout: Path | None, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ}
        if checkout is not None:
            env["PYTHONPATH"] = str(checkout)
        cmd = [sys.executable, "-m", "loramux.cli", "serve", *args, "--port", str(self.port)]
        self.t0 = time.monotonic()
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        cwd = checkout or Path(__file__).resolve().parents[1]  # `-m` puts the cwd first on sys.path
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd)

    def first_answer(self, model: str, timeout: float = 600) -> float:
        import httpx

        body = {"model": model, "prompt": "say: hello world\n", "max_tokens": 8, "temperature": 0}
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                r = httpx.post(self.url + "/v1/completions", json=body, timeout=60)
                if r.status_code == 200 and r.json()["choices"][0]["text"] is not None:
                    return time.monotonic() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"no answer within {timeout} s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def mixed(url: str, seed: int, n: int) -> None:
    import httpx

    rng = random.Random(seed)
    models = ["mid", *(f"ad{i}" for i in range(N_ADAPTERS))]
    jobs = [
        {
            "model": rng.choice(models),
            "prompt": " ".join(rng.choices(WORDS, k=24)),
            "max_tokens": rng.randint(8, 64),
            "ignore_eos": True,
            "temperature": 0,
        }
        for _ in range(n)
    ]

    def one(body: dict) -> None:
        r = httpx.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()

    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, jobs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "loramux" / "bench")
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--requests", type=int, default=N_REQUESTS, help="mixed requests before RSS is read")
    p.add_argument("--baseline", type=Path, help="another checkout to alternate with (PYTHONPATH)")
    p.add_argument("--scenarios", nargs="+", choices=["demo", "adapters"], default=["demo", "adapters"])
    a = p.parse_args()
    logs = a.cache_dir / "start-logs"
    logs.mkdir(parents=True, exist_ok=True)
    model, modules = build(a.cache_dir)
    sides: list[tuple[str, Path | None]] = [("this checkout", None)]
    if a.baseline is not None:
        sides.append((f"baseline {a.baseline}", a.baseline))
    rows: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    for k in range(a.starts):
        for side, checkout in sides:
            if "demo" in a.scenarios:
                s = Started([], checkout, logs / f"demo-{k}-{len(rows)}.log")
                try:
                    first = s.first_answer("upper")
                    rss = status_kb(s.proc.pid, "VmRSS") / 1024
                    rows.setdefault(("demo", side), []).append(
                        (first, rss, status_kb(s.proc.pid, "VmHWM") / 1024)
                    )
                finally:
                    s.stop()
            if "adapters" in a.scenarios:
                s = Started(
                    [str(model), "--served-model-name", "mid", "--lora-modules", *modules],
                    checkout,
                    logs / f"adapters-{k}-{len(rows)}.log",
                )
                try:
                    first = s.first_answer("ad0")
                    mixed(s.url, k, a.requests)
                    rss = status_kb(s.proc.pid, "VmRSS") / 1024
                    rows.setdefault(("100 adapters", side), []).append(
                        (first, rss, status_kb(s.proc.pid, "VmHWM") / 1024)
                    )
                finally:
                    s.stop()
            print(k, side, {key: v[-1] for key, v in rows.items() if key[1] == side}, flush=True)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}; {a.starts} starts per row, alternating; {time.strftime('%Y-%m-%d')}\n"
    )
    print("| scenario | code | first answer, s: median (each start) | RSS after, MB | peak RSS, MB |")
    print("|---|---|---|---|---|")
    for (scenario, side), vals in rows.items():
        firsts = ", ".join(f"{v[0]:.2f}" for v in vals)
        print(
            f"| {scenario} | {side} | {statistics.median(v[0] for v in vals):.2f} ({firsts}) | "
            f"{statistics.median(v[1] for v in vals):.0f} | {statistics.median(v[2] for v in vals):.0f} |"
        )


if __name__ == "__main__":
    main()
