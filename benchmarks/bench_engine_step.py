"""The engine's own time per step, with the model taken out: what bookkeeping around a step costs.

Not a test. Runs `LLMEngine` over an executor that computes nothing (every sampled token is 1;
adapters are the fake executor's), so a step's time is the scheduler, the engine's per-token work
(detokenizing is off: no tokenizer) and the outputs: what a change to per-token bookkeeping can
make slower. `--requests` decode at
once (default 256, vLLM's max_num_seqs), each for `--tokens` tokens; prints the median step time
over the decode steps of `--reps` runs.

    python benchmarks/bench_engine_step.py [--requests 256] [--tokens 200] [--reps 5] [--step-log]

Compare two checkouts by running it under each (PYTHONPATH=<checkout>), alternating.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from loramux.config import CacheConfig, EngineConfig, LogConfig, LoRAConfig, ModelConfig, SchedulerConfig
from loramux.core.outputs import RunnerOutput
from loramux.engine.llm_engine import LLMEngine
from loramux.executor.fake import FakeExecutor
from loramux.sampling_params import SamplingParams


class NullExecutor(FakeExecutor):
    def execute(self, out):  # type: ignore[no-untyped-def]
        self.apply_adapter_plan(out.adapter_plan)
        return RunnerOutput([1 if s.sample else None for s in out.seqs])


def run(requests: int, tokens: int, step_log: str | None = None) -> list[float]:
    pages = requests * (-(-(16 + tokens) // 16) + 1)
    cfg = EngineConfig(
        ModelConfig("fake"),
        SchedulerConfig(max_num_seqs=requests, max_num_batched_tokens=max(2048, requests * 16)),
        CacheConfig(page_size=16, num_pages=pages),
        LoRAConfig(max_loras=8),
        logs=LogConfig(step_log=step_log),
    )
    engine = LLMEngine(cfg, executor=NullExecutor(pages, 16, vocab_size=1000), tokenizer=None)
    for i in range(8):
        engine.add_lora(f"a{i}", f"/adapters/a{i}")
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    for i in range(requests):
        engine.add_request(f"r{i}", [1 + (i + j) % 900 for j in range(16)], params, lora_name=f"a{i % 8}")
    times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return times[2:]  # decode steps (the first ones prefill)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--step-log",
        action="store_true",
        help="also run with the step log on (to a temporary file), interleaved with runs without it",
    )
    a = p.parse_args()
    modes = {"step log off": None}
    if a.step_log:
        import tempfile

        modes["step log on"] = str(Path(tempfile.mkdtemp()) / "steps.jsonl")
    medians: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(a.reps):
        for mode, path in modes.items():
            medians[mode].append(1e3 * statistics.median(run(a.requests, a.tokens, path)))
    for mode, ms in medians.items():
        print(f"engine step, {a.requests} decoding requests, {mode}: median {statistics.median(ms):.3f} ms")
        print("runs:", ", ".join(f"{m:.3f}" for m in ms))


if __name__ == "__main__":
    main()
